import Foundation
import SystemPackage
import Testing

@testable import ExactIO

// The forms added so that the API can grow without breaking it: withExactly lending a RawSpan,
// closures with an error type of their own, readExactly(into:) filling an OutputRawSpan or an
// OutputSpan<UInt8>, and the AsyncExactReader options that are refused instead of ignored.

/// A caller's own error type, to see it come back unchanged.
enum Stop: Error, Equatable {
    case at(Int)
}

/// A reader over a unix socket whose peer has written `bytes` and closed.
private func readerOver(_ bytes: [UInt8], _ backend: ExactReader.Backend, staging: Int = 64 << 10) throws -> (ExactReader, Channel, Writer) {
    let (ch, writer) = try stream(.unix, bytes)
    return (try ExactReader(ch.read, options: options(backend, staging: staging)), ch, writer)
}

@Suite struct SpanFormTests {
    @Test(arguments: testBackends)
    func withExactlyLendsARawSpanStagedOrNot(backend: ExactReader.Backend) throws {
        let data = pattern(300_000, seed: 3)
        let (reader, ch, writer) = try readerOver(data, backend)
        defer { ch.close(); writer.join() }
        // Staged (small), then a large read straight into its own memory: the same bytes.
        let first = try reader.withExactly(100) { (bytes: RawSpan) in bytes.withUnsafeBytes { Array($0) } }
        #expect(first == Array(data[0..<100]))
        #expect(reader.statistics.bytesCopied == 0, "staged bytes are lent where they are")
        let count = try reader.withExactly(200_000) { $0.byteCount }  // only RawSpan has byteCount
        #expect(count == 200_000)
        #expect(reader.statistics.bytesCopied <= 64 << 10, "a large read copies at most what was staged")
        let large = try reader.withExactly(99_900) { (bytes: RawSpan) -> [UInt8] in
            var out: [UInt8] = []
            out.reserveCapacity(bytes.byteCount)
            bytes.withUnsafeBytes { out.append(contentsOf: $0) }
            return out
        }
        #expect(large == Array(data[200_100...]))
        writer.join()  // the peer has closed: isAtEOF never waits for it
        #expect(reader.isAtEOF)
    }

    @Test func closuresThatFitBothFormsTakeThePointerAndCompile() throws {
        let (reader, ch, writer) = try readerOver(pattern(64), .posix)
        defer { ch.close(); writer.join() }
        // No stated type, both forms would do: the pointer form (no ambiguity).
        let seven = try reader.withExactly(4) { _ in 7 }
        #expect(seven == 7)
        let n = try reader.withExactly(4) { $0.count }  // UnsafeRawBufferPointer.count
        #expect(n == 4)
        try reader.withExactly(4) { _ in }
        let loaded = try reader.withExactly(4) { $0.loadUnaligned(as: UInt32.self) }
        #expect(loaded == pattern(64)[12..<16].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
    }

    @Test(arguments: testBackends)
    func aClosuresOwnErrorTypePassesThrough(backend: ExactReader.Backend) throws {
        let bodies = (0..<6).map { pattern(10 + $0, seed: UInt64($0)) }
        let (reader, ch, writer) = try readerOver(bodies.flatMap(frame) + pattern(8), backend)
        defer { ch.close(); writer.join() }
        // A closure typed `throws(Stop)`: its error arrives as it was thrown.
        do {
            _ = try reader.withNextFrame { (frame: RawSpan) throws(Stop) -> Int in throw .at(frame.byteCount) }
            Issue.record("no error")
        } catch Stop.at(let n) {
            #expect(n == 10)
        }
        var seen = 0
        do {
            try reader.forEachFrame { (frame: RawSpan) throws(Stop) in
                seen += 1
                if frame.byteCount == 12 { throw .at(seen) }
            }
            Issue.record("no error")
        } catch let stop as Stop {
            #expect(stop == .at(2))
        }
        let stopped = try reader.forEachFrame { (frame: RawSpan) throws(Stop) -> Bool in frame.byteCount < 14 }
        #expect(stopped == 2, "frames of 13 and 14 bytes: stops after the one that returned false")
        // A closure that cannot throw: E is Never.
        let length = try reader.withNextFrame { (frame: RawSpan) -> Int in frame.byteCount }
        #expect(length == 15)
        #expect(throws: Stop.at(4)) {
            try reader.withExactly(4) { (bytes: UnsafeRawBufferPointer) throws(Stop) in throw .at(bytes.count) }
        }
        #expect(throws: Stop.at(4)) {
            try reader.withExactly(4) { (bytes: RawSpan) throws(Stop) in throw .at(bytes.byteCount) }
        }
    }

    @Test(arguments: testBackends)
    func readExactlyFillsAnOutputSpanOfANewArray(backend: ExactReader.Backend) throws {
        let data = pattern(200_000, seed: 9)
        let (reader, ch, writer) = try readerOver(data, backend)
        defer { ch.close(); writer.join() }
        let small = try [UInt8](capacity: 1000) { try reader.readExactly(into: &$0) }
        #expect(small == Array(data[0..<1000]))
        var more = [UInt8](data[0..<10])
        try more.append(addingCapacity: 150_000) { try reader.readExactly(into: &$0) }
        #expect(more == Array(data[0..<10]) + Array(data[1000..<151_000]))
        // The stream ends first: the bytes that came are in the array, and in the error.
        var tail: [UInt8] = []
        do {
            try tail.append(addingCapacity: 60_000) { span in
                do {
                    try reader.readExactly(into: &span)
                } catch ExactReadError.incomplete(let partial, let expected) {
                    #expect(span.count == partial.count)
                    #expect(expected == 60_000)
                    throw ExactReadError.incomplete(partial: partial, expected: expected)
                }
            }
            Issue.record("no error")
        } catch ExactReadError.incomplete(let partial, _) {
            #expect(partial == ByteView(data[151_000...]))
        }
    }

    @Test(arguments: testBackends)
    func readExactlyFillsTheFreeCapacityOfAnOutputRawSpan(backend: ExactReader.Backend) throws {
        let data = pattern(100_000, seed: 4)
        let (reader, ch, writer) = try readerOver(data, backend)
        defer { ch.close(); writer.join() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 90_000, alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: [7, 7, 7])
        var output = OutputRawSpan(buffer: buffer, initializedCount: 3)
        try reader.readExactly(into: &output)
        #expect(output.byteCount == 90_000)
        try reader.readExactly(into: &output)  // full: nothing to do
        let count = output.finalize(for: buffer)
        #expect(count == 90_000)
        #expect(Array(buffer[0..<3]) == [7, 7, 7])
        #expect(Array(buffer[3...]) == Array(data[0..<89_997]))
        // Incomplete: what arrived is appended.
        var rest = OutputRawSpan(buffer: buffer, initializedCount: 0)
        #expect(throws: ExactReadError.self) { try reader.readExactly(into: &rest) }
        #expect(rest.byteCount == 100_000 - 89_997)
        _ = rest.finalize(for: buffer)
        #expect(Array(buffer[0..<(100_000 - 89_997)]) == Array(data[89_997...]))
    }

    @Test func anErrnoAppendsNothingAndTheBytesStayInTheReader() throws {
        let (a, b) = try socketPair(AF_UNIX)
        defer { try? a.close(); try? b.close() }
        let reader = try ExactReader(a, options: .init(backend: .posix, readTimeout: .milliseconds(50)))
        _ = try b.writeAll(pattern(10))
        var bytes = [UInt8]()
        #expect(throws: Errno.timedOut) {
            try bytes.append(addingCapacity: 20) { try reader.readExactly(into: &$0) }
        }
        #expect(bytes.isEmpty)
        #expect(reader.bufferedCount == 10, "the 10 bytes that came stay buffered")
        _ = try b.writeAll(pattern(10, seed: 2))
        try bytes.append(addingCapacity: 20) { try reader.readExactly(into: &$0) }
        #expect(bytes == pattern(10) + pattern(10, seed: 2))
    }
}

@Suite struct AsyncReaderOptionTests {
    @Test func optionsItWouldIgnoreAreRefusedAndTheRestAccepted() async throws {
        let loop = try IOLoop(options: .init(backend: .posix))
        let (a, b) = try socketPair(AF_UNIX)
        defer { try? a.close(); try? b.close() }
        func refused(_ o: ExactReader.Options) -> String? {
            do {
                _ = try AsyncExactReader(a, loop: loop, options: o)
                return nil
            } catch let e as ExactReader.InvalidOptionError {
                return e.option
            } catch {
                return "\(error)"
            }
        }
        #expect(refused(.init(backend: .ioUring)) == "backend")
        #expect(refused(.init(directIO: true)) == "directIO")
        #expect(refused(.init(queueDepth: 8)) == "queueDepth")
        // Accepted: the defaults, DESIGN's example, the loop's own backend, a registration limit.
        #expect(refused(.init()) == nil)
        #expect(refused(.init(maxFrameLength: 1 << 20)) == nil)
        #expect(refused(.init(backend: .posix)) == nil)
        #expect(refused(.init(backend: .automatic)) == nil)
        #expect(refused(.init(registeredMemoryLimit: 0)) == nil)
        // And what is accepted works.
        let reader = try AsyncExactReader(a, loop: loop, options: .init(maxFrameLength: 1 << 20))
        _ = try b.writeAll(frame(pattern(100)) + pattern(4))
        #expect(try await reader.readFrame() == ByteView(pattern(100)))
        let word = try await reader.withExactly(4) { (bytes: RawSpan) in bytes.byteCount }
        #expect(word == 4)
        await loop.shutdown()
    }
}

/// The guidance for the enums that may gain cases before 1.0: a `switch` that ends with
/// `@unknown default:` compiles without a warning while it covers every case (CI builds the
/// tests with warnings as errors), so that an added case is a warning in a caller, not a
/// broken build.
@Suite struct UnknownDefaultGuidanceTests {
    func kind(_ error: ExactReadError) -> String {
        switch error {
        case .incomplete: "incomplete"
        case .frameTooLarge: "frameTooLarge"
        case .invalidLength: "invalidLength"
        @unknown default: "other"
        }
    }

    func kind(_ step: ExactReader.FallbackReason.Step) -> String {
        switch step {
        case .forcedByEnvironment, .environmentIgnored, .ringSetup, .probe, .missingOperations,
            .bufferRegistration, .inheritedThroughFork, .notInThisBuild:
            "\(step)"
        @unknown default: "other"
        }
    }

    func width(_ prefix: LengthPrefix) -> Int? {
        switch prefix {
        case .uint8: 1
        case .uint16: 2
        case .uint32: 4
        case .uint64: 8
        case .varint: nil
        @unknown default: nil
        }
    }

    func kind(_ backend: ExactReader.Backend) -> String {
        switch backend {
        case .automatic, .ioUring, .posix: backend.description
        @unknown default: "other"
        }
    }

    @Test func switchesWithUnknownDefaultCoverEveryCaseToday() throws {
        #expect(kind(ExactReadError.frameTooLarge(length: 9, limit: 8)) == "frameTooLarge")
        #expect(kind(ExactReadError.incomplete(partial: ByteView(), expected: 4)) == "incomplete")
        #expect(kind(ExactReadError.invalidLength(length: 1, bodyLength: -3)) == "invalidLength")
        #expect(kind(ExactReader.FallbackReason.Step.probe) != "other")
        #expect(width(.uint16(.littleEndian)) == 2)
        #expect(width(.varint) == nil)
        #expect(kind(.posix) == "posix")
        // And by pattern, as the examples catch them: no `@unknown default` needed.
        let (reader, ch, writer) = try readerOver([0, 0, 0, 9] + pattern(3), .posix)
        defer { ch.close(); writer.join() }
        do {
            _ = try reader.readFrame()
            Issue.record("no error")
        } catch ExactReadError.incomplete(let partial, let expected) {
            #expect(partial.count == 3 && expected == 9)
        }
    }
}

/// The same forms on the async reader: closures with an error type of their own for
/// withNextFrame, forEachFrame and withExactly, and withExactly lending a RawSpan.
@Suite struct AsyncSpanFormTests {
    @Test(arguments: testBackends)
    func aClosuresOwnErrorTypePassesThroughTheAsyncReader(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop, seconds: 60)
        defer { dog.cancel() }
        let bodies = (0..<6).map { pattern(10 + $0, seed: UInt64($0)) }
        let (ch, writer) = try stream(.unix, bodies.flatMap(frame) + pattern(8) + pattern(100_000, seed: 5))
        defer { ch.close() }
        let reader = try AsyncExactReader(ch.read, loop: loop, options: .init(stagingCapacity: 64 << 10))
        do {
            _ = try await reader.withNextFrame { (frame: RawSpan) throws(Stop) -> Int in throw .at(frame.byteCount) }
            Issue.record("no error")
        } catch Stop.at(let n) {
            #expect(n == 10)
        }
        var seen = 0
        do {
            try await reader.forEachFrame { (frame: RawSpan) throws(Stop) in
                seen += 1
                if frame.byteCount == 12 { throw .at(seen) }
            }
            Issue.record("no error")
        } catch let stop as Stop {
            #expect(stop == .at(2))
        }
        let stopped = try await reader.forEachFrame { (frame: RawSpan) throws(Stop) -> Bool in frame.byteCount < 14 }
        #expect(stopped == 2, "frames of 13 and 14 bytes: stops after the one that returned false")
        let length = try await reader.withNextFrame { (frame: RawSpan) -> Int in frame.byteCount }  // E == Never
        #expect(length == 15)
        await #expect(throws: Stop.at(4)) {
            try await reader.withExactly(4) { (bytes: UnsafeRawBufferPointer) throws(Stop) in throw .at(bytes.count) }
        }
        await #expect(throws: Stop.at(4)) {
            try await reader.withExactly(4) { (bytes: RawSpan) throws(Stop) in throw .at(bytes.byteCount) }
        }
        // A span over a large read (straight into memory of its own), then untyped closures.
        let large = try await reader.withExactly(99_000) { (bytes: RawSpan) in bytes.withUnsafeBytes { Array($0) } }
        #expect(large == Array(pattern(100_000, seed: 5)[0..<99_000]))
        let count = try await reader.withExactly(1000) { $0.count }  // the pointer form
        #expect(count == 1000)
        await writer.finished()
        #expect(try await reader.withNextFrame { _ in 1 } == nil)
        await loop.shutdown()
    }
}
