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

/// The borrowing frame API: `withNextFrame(prefix:_:)`, `forEachFrame(prefix:_:)`, and
/// `withExactly`'s in-place fast path.
@Suite struct BorrowTests {
    struct Failure: Error, Equatable {}

    /// Bodies of every kind of size: empty, small (staged), larger than staging (read straight
    /// into memory of their own, the slow path).
    static func bodies() -> [[UInt8]] {
        [0, 1, 64, 1000, 0, 4096, 200_000, 3, 70_000, 64].enumerated().map { pattern($1, seed: UInt64($0 + 1)) }
    }

    @Test(arguments: testBackends, [Transport.unix, .pipe, .file])
    func forEachFrameSeesEveryFrameInOrder(backend: ExactReader.Backend, transport: Transport) throws {
        let bodies = Self.bodies()
        let (ch, writer) = try stream(transport, bodies.flatMap(frame), chunks: [1, 7, 5000, 65536])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        var seen: [[UInt8]] = []
        let count = try reader.forEachFrame { frame in
            seen.append(frame.withUnsafeBytes { Array($0) })
        }
        #expect(count == bodies.count)
        #expect(seen == bodies)
        #expect(reader.isAtEOF)
        writer.join()
    }

    @Test(arguments: testBackends, FrameTests.prefixes)
    func withNextFrameReadsEveryPrefixKindThenNil(backend: ExactReader.Backend, prefix: LengthPrefix) throws {
        let lengths = [0, 1, 127, 128, 255]
        let bodies = lengths.map { pattern($0, seed: UInt64($0) + 9) }
        let (ch, writer) = try stream(.unix, bodies.flatMap { encode(UInt64($0.count), prefix) + $0 }, chunks: [1, 3, 4096])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        for b in bodies {
            let got = try reader.withNextFrame(prefix: prefix) { frame in frame.withUnsafeBytes { Array($0) } }
            #expect(got == b)
        }
        var called = false
        let end: Void? = try reader.withNextFrame(prefix: prefix) { _ in called = true }
        #expect(end == nil, "nil at a clean end of stream")
        #expect(!called, "the body is not called at the end of the stream")
        writer.join()
    }

    @Test(arguments: testBackends, [5, 100, 300_000])
    func endOfStreamInsideAFrameIsIncompleteWithThePartialBody(backend: ExactReader.Backend, length: Int) throws {
        let body = pattern(length)
        let cut = length - 2
        let (ch, writer) = try stream(.unix, frame(pattern(10)) + Array(frame(body)[0..<(4 + cut)]), chunks: [4096])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(try reader.withNextFrame { $0.byteCount } == 10)
        var called = false
        #expect(throws: ExactReadError.incomplete(partial: ByteView(Array(body[0..<cut])), expected: length)) {
            try reader.withNextFrame { _ in called = true }
        }
        #expect(!called)
        writer.join()
    }

    @Test(arguments: testBackends)
    func endOfStreamInsideAPrefixIsIncomplete(backend: ExactReader.Backend) throws {
        let (ch, writer) = try stream(.pipe, [0, 0])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(throws: ExactReadError.incomplete(partial: ByteView([0, 0]), expected: 4)) {
            try reader.forEachFrame { _ in Issue.record("no frame expected") }
        }
        writer.join()
    }

    @Test(arguments: testBackends)
    func oversizedPrefixIsRefusedWithTheBodyLeftUnread(backend: ExactReader.Backend) throws {
        let body = pattern(100)
        let (ch, writer) = try stream(.unix, frame(pattern(8)) + [0x7F, 0xFF, 0xFF, 0xFF] + body)
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend, maxFrame: 1 << 20))
        let blocks = reader.pool.snapshot.liveBlocks
        var frames = 0
        #expect(throws: ExactReadError.frameTooLarge(length: 0x7FFF_FFFF, limit: 1 << 20)) {
            try reader.forEachFrame { _ in frames += 1 }
        }
        #expect(frames == 1, "the frame before the bad prefix was delivered")
        #expect(reader.pool.snapshot.liveBlocks == blocks, "no memory mapped for the body")
        #expect(try reader.readExactly(100) == ByteView(body))
        writer.join()
    }

    @Test(arguments: testBackends, [10, 100_000])
    func aThrowingBodyConsumesItsFrameAndNothingMore(backend: ExactReader.Backend, length: Int) throws {
        let a = pattern(length, seed: 3), b = pattern(20, seed: 4)
        let (ch, writer) = try stream(.unix, frame(a) + frame(b))
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(throws: Failure()) {
            try reader.withNextFrame { frame in
                #expect(frame.byteCount == length)
                throw Failure()
            }
        }
        #expect(try reader.readFrame() == ByteView(b))
        #expect(try reader.readFrame() == nil)
        writer.join()
    }

    @Test(arguments: testBackends)
    func forEachFrameStopsWhenTheBodyReturnsFalse(backend: ExactReader.Backend) throws {
        let bodies = (0..<10).map { pattern(50 + $0, seed: UInt64($0)) }
        let (ch, writer) = try stream(.unix, bodies.flatMap(frame))
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        var seen = 0
        let count = try reader.forEachFrame { (frame: RawSpan) -> Bool in
            seen += 1
            return seen < 3
        }
        #expect(count == 3)
        #expect(seen == 3)
        #expect(try reader.readFrame() == ByteView(bodies[3]), "the frames after the stop are unread")
        #expect(try reader.forEachFrame { _ in } == 6)
        writer.join()
    }

    @Test(arguments: testBackends)
    func anErrnoLeavesTheFrameForARetry(backend: ExactReader.Backend) throws {
        // A reset in the middle of a staged-size body: withNextFrame throws and consumes nothing.
        let (a, b) = try socketPair(AF_UNIX)
        defer { try? a.close() }
        let body = pattern(1000)
        let wire = frame(body)
        try wire.withUnsafeBytes { try writeAll(b, UnsafeRawBufferPointer(rebasing: $0[0..<500])) }
        let reader = try ExactReader(a, options: options(backend, maxFrame: 1 << 20).with(timeout: .milliseconds(50)))
        var called = false
        #expect(throws: Errno.timedOut) {
            try reader.withNextFrame { _ in called = true }
        }
        #expect(!called)
        try wire.withUnsafeBytes { try writeAll(b, UnsafeRawBufferPointer(rebasing: $0[500...])) }
        try b.close()
        #expect(try reader.withNextFrame { $0.withUnsafeBytes { Array($0) } } == body)
    }

    /// A body that uses the reader while its frame is lent: the frame's bytes stay put even when
    /// the reader has to make room (staging would otherwise be compacted over them).
    @Test(arguments: testBackends)
    func theLentFrameSurvivesReadsFromItsBody(backend: ExactReader.Backend) throws {
        let small = (0..<40).map { pattern(1500, seed: UInt64($0)) }
        let big = pattern(60_000, seed: 99)
        let wire = small.flatMap(frame) + frame(big) + small.flatMap(frame)
        let (ch, writer) = try stream(.unix, wire, chunks: [30_000])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend, staging: 64 << 10))
        var i = 0
        try reader.forEachFrame { (frame: RawSpan) -> Bool in
            let before = frame.withUnsafeBytes { Array($0) }
            #expect(before == small[i % small.count])
            if i == small.count - 1 {
                // Lent frame at the end of staging; this read needs staging's room.
                #expect(try reader.readFrame() == ByteView(big))
                try reader.withExactly(4) { _ in }  // nested lending
                #expect(try reader.readExactly(1500) == ByteView(small[0]))
                i += 1
            }
            #expect(frame.withUnsafeBytes { Array($0) } == before, "the lent bytes did not change")
            i += 1
            return true
        }
        #expect(i == 2 * small.count)
        writer.join()
    }

    @Test(arguments: testBackends)
    func withExactlyLendsStagedBytesInPlace(backend: ExactReader.Backend) throws {
        let data = pattern(10_000)
        let (ch, writer) = try stream(.file, data)
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(try reader.withExactly(100) { Array($0) } == Array(data[0..<100]))
        let staged = reader.statistics.stagedViews
        let copied = reader.statistics.bytesCopied
        #expect(try reader.withExactly(900) { Array($0) } == Array(data[100..<1000]))
        #expect(reader.statistics.stagedViews == staged + 1, "served from staging")
        #expect(reader.statistics.bytesCopied == copied, "no copy")
        #expect(throws: Failure()) { try reader.withExactly(10) { _ in throw Failure() } }
        #expect(try reader.readExactly(5) == ByteView(data[1010..<1015]), "a throwing body consumed its bytes")
        writer.join()
    }
}

extension ExactReader.Options {
    func with(timeout: Duration) -> Self {
        var o = self
        o.readTimeout = timeout
        return o
    }
}

/// Closures of every shape compile against `forEachFrame` without ambiguity (README's examples).
@Suite struct ForEachFrameShapesTests {
    @Test func closureShapes() throws {
        let bodies = (0..<6).map { pattern(10 + $0, seed: UInt64($0)) }
        let (ch, writer) = try stream(.file, bodies.flatMap(frame))
        defer { ch.close() }
        let reader = try ExactReader(ch.read)
        var total = 0
        // A single expression returning Void, and one whose value is generic.
        #expect(try reader.forEachFrame { frame in total += frame.byteCount } == 6)
        _ = try reader.withNextFrame { frame in frame.withUnsafeBytes { total += $0.count } }
        let (ch2, writer2) = try stream(.file, bodies.flatMap(frame))
        defer { ch2.close() }
        let reader2 = try ExactReader(ch2.read)
        try reader2.forEachFrame { frame in frame.withUnsafeBytes { total += $0.count } }
        #expect(total == 2 * bodies.reduce(0) { $0 + $1.count })
        let (ch3, writer3) = try stream(.file, bodies.flatMap(frame))
        defer { ch3.close() }
        let reader3 = try ExactReader(ch3.read)
        // An early stop with `return`.
        #expect(try reader3.forEachFrame { frame in return frame.byteCount < 12 } == 3)
        writer.join()
        writer2.join()
        writer3.join()
    }
}
