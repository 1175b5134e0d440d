#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage
import Testing
@testable import ExactIO

func encode(_ length: UInt64, _ prefix: LengthPrefix) -> [UInt8] {
    func bytes(_ width: Int, _ e: LengthPrefix.Endianness) -> [UInt8] {
        let be = (0..<width).reversed().map { UInt8(truncatingIfNeeded: length >> UInt64(8 * $0)) }
        return e == .bigEndian ? be : be.reversed()
    }
    switch prefix {
    case .uint8: return [UInt8(length)]
    case .uint16(let e): return bytes(2, e)
    case .uint32(let e): return bytes(4, e)
    case .uint64(let e): return bytes(8, e)
    case .varint:
        var v = length
        var out: [UInt8] = []
        repeat {
            var b = UInt8(v & 0x7f)
            v >>= 7
            if v != 0 { b |= 0x80 }
            out.append(b)
        } while v != 0
        return out
    }
}

@Suite struct FrameTests {
    static let prefixes: [LengthPrefix] = [
        .uint8, .uint16(.bigEndian), .uint16(.littleEndian), .uint32(.bigEndian), .uint32(.littleEndian),
        .uint64(.bigEndian), .uint64(.littleEndian), .varint,
    ]

    @Test(arguments: testBackends, prefixes)
    func everyPrefixKind(backend: ExactReader.Backend, prefix: LengthPrefix) throws {
        let maxLen = prefix == .uint8 ? 255 : (prefix == .uint16(.bigEndian) || prefix == .uint16(.littleEndian) ? 65535 : 70_000)
        let lengths = [0, 1, 127, 128, 255, maxLen]
        let bodies = lengths.map { pattern($0, seed: UInt64($0)) }
        let wire = bodies.flatMap { encode(UInt64($0.count), prefix) + $0 }
        let (ch, writer) = try stream(.unix, wire, chunks: [1, 2, 3, 5000])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        for b in bodies {
            let f = try #require(try reader.readFrame(prefix: prefix))
            #expect(f == ByteView(b))
        }
        #expect(try reader.readFrame(prefix: prefix) == nil)
        writer.join()
    }

    @Test func varintEncodingMatchesProtobuf() throws {
        #expect(encode(300, .varint) == [0xAC, 0x02])
        #expect(encode(UInt64.max, .varint).count == 10)
        let (ch, writer) = try stream(.pipe, [0xAC, 0x02] + pattern(300))
        defer { ch.close() }
        let reader = try ExactReader(ch.read)
        #expect(try reader.readFrame(prefix: .varint)?.count == 300)
        writer.join()
    }

    @Test(arguments: testBackends)
    func hostileLengthIsRefusedBeforeAnyAllocation(backend: ExactReader.Backend) throws {
        let body = pattern(100)
        let (ch, writer) = try stream(.unix, [0xFF, 0xFF, 0xFF, 0xFF] + body)
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend, maxFrame: 1 << 20))
        let before = reader.pool.snapshot.liveBlocks
        #expect(throws: ExactReadError.frameTooLarge(length: 0xFFFF_FFFF, limit: 1 << 20)) {
            try reader.readFrame()
        }
        #expect(reader.pool.snapshot.liveBlocks == before, "no memory mapped for the body")
        // The body is left unread: the caller can read or skip it.
        #expect(try reader.readExactly(100) == ByteView(body))
        writer.join()
    }

    @Test(arguments: testBackends)
    func uint64AboveIntMaxIsRefused(backend: ExactReader.Backend) throws {
        let (ch, writer) = try stream(.pipe, [0xFF, 0, 0, 0, 0, 0, 0, 1])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: .init(backend: backend, maxFrameLength: Int.max))
        #expect(throws: ExactReadError.frameTooLarge(length: 0xFF00_0000_0000_0001, limit: Int.max)) {
            try reader.readFrame(prefix: .uint64(.bigEndian))
        }
        writer.join()
    }

    @Test(arguments: testBackends)
    func elevenByteVarintIsRefused(backend: ExactReader.Backend) throws {
        let wire = [UInt8](repeating: 0xFF, count: 10) + [0x01] + [7]
        let (ch, writer) = try stream(.pipe, wire)
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        let before = reader.pool.snapshot.liveBlocks
        #expect(throws: ExactReadError.frameTooLarge(length: .max, limit: 64 << 20)) {
            try reader.readFrame(prefix: .varint)
        }
        #expect(reader.pool.snapshot.liveBlocks == before)
        writer.join()
    }

    @Test func tenByteVarintOfMaxIsStillTooLarge() throws {
        let wire = encode(UInt64.max, .varint)
        let (ch, writer) = try stream(.pipe, wire)
        defer { ch.close() }
        let reader = try ExactReader(ch.read)
        #expect(throws: ExactReadError.frameTooLarge(length: .max, limit: 64 << 20)) {
            try reader.readFrame(prefix: .varint)
        }
        writer.join()
    }

    @Test func frameAtTheLimitIsAccepted() throws {
        let (ch, writer) = try stream(.pipe, frame(pattern(1000)))
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: .init(maxFrameLength: 1000))
        #expect(try reader.readFrame()?.count == 1000)
        writer.join()
    }

    @Test func truncatedVarintIsIncomplete() throws {
        let (ch, writer) = try stream(.pipe, [0x80, 0x80])
        defer { ch.close() }
        let reader = try ExactReader(ch.read)
        #expect(throws: ExactReadError.incomplete(partial: ByteView([0x80, 0x80]), expected: 3)) {
            try reader.readFrame(prefix: .varint)
        }
        writer.join()
    }
}
