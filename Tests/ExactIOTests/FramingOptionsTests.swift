import Logging
import SystemPackage
import Testing
@testable import ExactIO

/// `Options.lengthAdjustment` and `Options.lengthIncludesPrefix`, on every frame call and both
/// backends, with frames arriving whole (the staged fast path) and a byte at a time (the slow
/// path).
@Suite struct FramingOptionsTests {
    static let chunkings: [[Int]] = [[1 << 20], [1]]

    func reader(_ backend: ExactReader.Backend, _ wire: [UInt8], chunks: [Int], adjustment: Int = 0,
                includesPrefix: Bool = false, maxFrame: Int = 64 << 20) throws -> (ExactReader, Channel, Writer) {
        let (ch, writer) = try stream(.unix, wire, chunks: chunks)
        var o = options(backend, maxFrame: maxFrame)
        o.lengthAdjustment = adjustment
        o.lengthIncludesPrefix = includesPrefix
        return (try ExactReader(ch.read, options: o), ch, writer)
    }

    @Test(arguments: testBackends, chunkings)
    func aLengthThatCountsItsPrefix(backend: ExactReader.Backend, chunks: [Int]) throws {
        for prefix in FrameTests.prefixes {
            let bodies = [pattern(0), pattern(3), pattern(200, seed: 2)]
            let wire = bodies.flatMap { body in
                // For a varint the width depends on the value it encodes: find the fixed point.
                var width = encode(UInt64(body.count), prefix).count
                while encode(UInt64(body.count + width), prefix).count != width { width += 1 }
                return encode(UInt64(body.count + width), prefix) + body
            }
            let (r, ch, writer) = try reader(backend, wire, chunks: chunks, includesPrefix: true)
            defer { ch.close() }
            #expect(try r.readFrame(prefix: prefix) == ByteView(bodies[0]), "\(prefix)")
            #expect(try r.withNextFrame(prefix: prefix) { Array($0.withUnsafeBytes { $0 }) } == bodies[1], "\(prefix)")
            var seen: [[UInt8]] = []
            #expect(try r.forEachFrame(prefix: prefix) { seen.append(Array($0.withUnsafeBytes { $0 })) } == 1)
            #expect(seen == [bodies[2]], "\(prefix)")
            writer.join()
        }
    }

    @Test(arguments: testBackends, chunkings)
    func aNegativeAdjustmentForAHeaderTheLengthCounts(backend: ExactReader.Backend, chunks: [Int]) throws {
        // A length that counts a 2-byte trailer too (e.g. a checksum the caller reads itself).
        let bodies = [pattern(10), pattern(100_000, seed: 3), pattern(0)]
        let wire: [UInt8] = bodies.flatMap { (body: [UInt8]) -> [UInt8] in encode(UInt64(body.count + 2), .uint32(.bigEndian)) + body + [0xEE, 0xFF] }
        let (r, ch, writer) = try reader(backend, wire, chunks: chunks, adjustment: -2)
        defer { ch.close() }
        for body in bodies {
            #expect(try r.readFrame() == ByteView(body))
            #expect(try r.readExactly(2) == ByteView([0xEE, 0xFF]))
        }
        #expect(try r.readFrame() == nil)
        writer.join()
    }

    @Test(arguments: testBackends, chunkings)
    func aPositiveAdjustment(backend: ExactReader.Backend, chunks: [Int]) throws {
        let body = pattern(40)
        let wire = encode(30, .uint16(.littleEndian)) + body
        let (r, ch, writer) = try reader(backend, wire, chunks: chunks, adjustment: 10)
        defer { ch.close() }
        #expect(try r.readFrame(prefix: .uint16(.littleEndian)) == ByteView(body))
        writer.join()
    }

    @Test(arguments: testBackends, chunkings)
    func aLengthShorterThanItsPrefixIsInvalidAndConsumesThePrefix(backend: ExactReader.Backend, chunks: [Int]) throws {
        let wire = encode(2, .uint32(.bigEndian)) + [7, 7, 7]
        let (r, ch, writer) = try reader(backend, wire, chunks: chunks, includesPrefix: true)
        defer { ch.close() }
        #expect(throws: ExactReadError.invalidLength(length: 2, bodyLength: -2)) { try r.readFrame() }
        #expect(try r.readExactly(3) == ByteView([7, 7, 7]), "only the prefix was consumed")
        writer.join()
    }

    @Test(arguments: testBackends)
    func theLimitAppliesToTheAdjustedLength(backend: ExactReader.Backend) throws {
        // 1000 announced, 1000 - 4 - 100 = 896 body bytes: within a limit of 900.
        let wire = encode(1000, .uint32(.bigEndian)) + pattern(896) + encode(1006, .uint32(.bigEndian))
        let (r, ch, writer) = try reader(backend, wire, chunks: [1 << 20], adjustment: -100, includesPrefix: true, maxFrame: 900)
        defer { ch.close() }
        #expect(try r.readFrame()?.count == 896)
        #expect(throws: ExactReadError.frameTooLarge(length: 902, limit: 900)) { try r.readFrame() }
        writer.join()
    }

    @Test func extremeAdjustmentsNeitherTrapNorWrap() throws {
        for (adjustment, length, expected) in [
            (Int.max, UInt64.max, ExactReadError.frameTooLarge(length: .max, limit: 64 << 20)),
            (Int.min, 0, ExactReadError.invalidLength(length: 0, bodyLength: .min)),
            (Int.min, UInt64.max, ExactReadError.frameTooLarge(length: UInt64(Int.max), limit: 64 << 20)),
        ] {
            let wire = encode(length, .uint64(.bigEndian))
            let (r, ch, writer) = try reader(.posix, wire, chunks: [1 << 20], adjustment: adjustment)
            defer { ch.close() }
            #expect(throws: expected) { try r.readFrame(prefix: .uint64(.bigEndian)) }
            writer.join()
        }
    }

    @Test func theAsyncReaderHonoursTheFramingOptions() async throws {
        let loop = try IOLoop()
        let body = pattern(5000)
        let (ch, writer) = try stream(.unix, encode(UInt64(body.count + 4 + 8), .uint32(.bigEndian)) + body + pattern(8))
        defer { ch.close() }
        var o = ExactReader.Options()
        o.lengthIncludesPrefix = true
        o.lengthAdjustment = -8
        let r = try AsyncExactReader(ch.read, loop: loop, options: o)
        #expect(try await r.readFrame() == ByteView(body))
        #expect(try await r.readExactly(8) == ByteView(pattern(8)))
        await writer.finished()
        await loop.shutdown()
    }
}

/// `Options.logger`: what an operator sees, at the levels swift-log asks libraries to use.
@Suite struct LoggingTests {
    final class Capture: @unchecked Sendable {
        let lock = Locked<[(Logger.Level, String, Logger.Metadata)]>([])
        var entries: [(Logger.Level, String, Logger.Metadata)] { lock.withLock { $0 } }
    }

    struct Handler: LogHandler {
        let capture: Capture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            capture.lock.withLock { $0.append((event.level, "\(event.message)", event.metadata ?? [:])) }
        }
    }

    @Test(arguments: testBackends)
    func creationFailuresAndLargeReadsAreLoggedBelowInfo(backend: ExactReader.Backend) throws {
        let capture = Capture()
        var o = options(backend, staging: 64 << 10, maxFrame: 1 << 20)
        o.logger = Logger(label: "test") { _ in Handler(capture: capture) }
        let big = pattern(200_000)
        let (ch, writer) = try stream(.unix, frame(big) + [0xFF, 0xFF, 0xFF, 0xFF])
        defer { ch.close() }
        let r = try ExactReader(ch.read, options: o)
        #expect(try r.readFrame() == ByteView(big))
        #expect(throws: ExactReadError.self) { try r.readFrame() }
        writer.join()
        let entries = capture.entries
        #expect(entries.allSatisfy { $0.0 == .debug || $0.0 == .trace }, "a library logs at trace/debug only")
        #expect(entries.contains { $0.1.contains("created") && $0.2["exactio.backend"] == "\(r.backend)" })
        #expect(entries.contains { $0.0 == .trace && $0.1.contains("large read") })
        #expect(entries.contains { $0.0 == .debug && $0.1.contains("failed") && "\($0.2["exactio.error"] ?? "")".contains("exceeds the limit") })
    }
}
