import ExactIOCTestSupport
import Foundation
import SystemPackage
import Testing
@_spi(Testing) @testable import ExactIO

/// The borrowing calls on the loop (`withNextFrame`, `forEachFrame`, `withExactly`): frames lent
/// in place as `RawSpan`s, in order, every byte right, the same atomicity as `readFrame`; and on
/// the received path no allocation per frame.
@Suite struct LoopBorrowTests {
    @Test(arguments: testBackends)
    func everyFrameIsLentInOrder(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop, seconds: 60)
        defer { dog.cancel() }
        let bodies = (0..<2000).map { k in pattern(k % 7 == 6 ? 70_000 : k % 300, seed: UInt64(k + 1)) }
        let (ch, writer) = try stream(.unix, bodies.flatMap(frame), chunks: [1, 7, 1000, 65536])
        defer { ch.close() }
        let reader = try AsyncExactReader(ch.read, loop: loop, options: .init(stagingCapacity: 64 << 10))
        // The first ten one by one, then the rest in one loop.
        for k in 0..<10 {
            let same = try await reader.withNextFrame { span in
                span.withUnsafeBytes { Array($0) == bodies[k] }
            }
            #expect(same == true)
        }
        var k = 10
        var wrong = 0
        let n = try await reader.forEachFrame { span in
            if !span.withUnsafeBytes({ Array($0) == bodies[k] }) { wrong += 1 }
            k += 1
        }
        await writer.finished()
        #expect(n == bodies.count - 10)
        #expect(wrong == 0)
        #expect(try await reader.withNextFrame { _ in 1 } == nil)  // a clean end
        await loop.shutdown()
    }

    @Test(arguments: testBackends)
    func forEachFrameStopsWhenTheBodySaysSo(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop, seconds: 60)
        defer { dog.cancel() }
        let bodies = (0..<100).map { pattern(10, seed: UInt64($0 + 1)) }
        let (ch, writer) = try stream(.unix, bodies.flatMap(frame))
        defer { ch.close() }
        let reader = try AsyncExactReader(ch.read, loop: loop)
        var seen = 0
        let n = try await reader.forEachFrame { (span: RawSpan) -> Bool in
            seen += 1
            return seen < 40
        }
        #expect(n == 40)
        // The rest stays unread, in order.
        #expect(try await reader.readFrame() == ByteView(bodies[40]))
        await writer.finished()
        await loop.shutdown()
    }

    @Test(arguments: testBackends)
    func withExactlyLendsReceivedBytesInPlace(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop, seconds: 60)
        defer { dog.cancel() }
        let bytes = pattern(300_000)
        let (ch, writer) = try stream(.unix, bytes, chunks: [3, 5000, 70_000])
        defer { ch.close() }
        let reader = try AsyncExactReader(ch.read, loop: loop)
        var at = 0
        for count in [0, 1, 100, 4096, 70_000, 25_000, 200_803] {
            let same = try await reader.withExactly(count) { Array($0) == Array(bytes[at..<(at + count)]) }
            #expect(same, "withExactly(\(count)) at \(at)")
            at += count
        }
        #expect(at == bytes.count)
        await writer.finished()
        await loop.shutdown()
    }

    /// A frame that is not all there yet is not consumed when the call fails: the next call
    /// reads it whole (the same atomicity as readFrame).
    @Test(arguments: testBackends)
    func aTimeoutConsumesNothing(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop, seconds: 60)
        defer { dog.cancel() }
        let (a, b) = try socketPair(AF_UNIX)
        defer { try? a.close(); try? b.close() }
        let reader = try AsyncExactReader(a, loop: loop, options: .init(readTimeout: .milliseconds(50)))
        let body = pattern(500)
        try send(b, Array(frame(body)[0..<200]))
        await #expect(throws: Errno.timedOut) { _ = try await reader.withNextFrame { _ in 0 } }
        try send(b, Array(frame(body)[200...]))
        let same = try await reader.withNextFrame { span in span.withUnsafeBytes { Array($0) == body } }
        #expect(same == true)
        await loop.shutdown()
    }

    /// Frames already received are lent with no allocation (counted on the calling thread:
    /// the calls run on the caller's executor, and received frames need no wait), a frame that
    /// spans two receive buffers included. Three connections, one after the other: an allocation
    /// per frame or per connection shows in each, while the Swift runtime's first use of a
    /// generic type or witness table (the first frame that spans two buffers, say) allocates
    /// its metadata once for the whole process, in whichever connection (and test) gets there
    /// first: 3-19 allocations when this test ran alone, none when another had run first.
    @Test(.enabled(if: ctest_malloc_counting_available() != 0, "malloc counting is unavailable under a sanitizer"),
          arguments: testBackends)
    func receivedFramesAreLentWithoutAllocating(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop, seconds: 60)
        defer { dog.cancel() }
        let body = pattern(40)
        let count = 1000
        /// Lends `count` received frames on a fresh connection; the allocations that took.
        func lendReceivedFrames() async throws -> Int64 {
            let (a, b) = try socketPair(AF_UNIX)
            defer { try? a.close(); try? b.close() }
            try send(b, (0..<(count + 1)).flatMap { _ in frame(body) })
            let reader = try AsyncExactReader(a, loop: loop)
            _ = try await reader.readFrame()  // the first: the loop receives everything
            while reader.bufferedCount < count * 44 { try await Task.sleep(for: .milliseconds(1)) }
            var sum = 0
            var seen = 0
            ctest_malloc_count_start()
            let n = try await reader.forEachFrame { (span: RawSpan) -> Bool in
                sum &+= Int(span.unsafeLoad(fromByteOffset: 1, as: UInt8.self))
                seen += 1
                return seen < count
            }
            let allocations = ctest_malloc_count_stop()
            #expect(n == count)
            #expect(sum == count * Int(body[1]))
            return allocations
        }
        var allocations: [Int64] = []
        for _ in 0..<3 { allocations.append(try await lendReceivedFrames()) }
        #expect(allocations.min() == 0, "\(allocations) allocations for \(count) received frames on each of three connections")
        await loop.shutdown()
    }

    /// A frame already received but not in one piece is lent without the slow path's heap
    /// copy, and with no copy at all when only its prefix spans two receive buffers. The
    /// harness cuts the stream where the test says, each segment in its receive buffer apart
    /// from the last (never continuing it): the first call reads frame A and receives frame B
    /// with it, cut `cut` bytes into B, so the second call finds B buffered in two pieces.
    @Test(arguments: [
        (cut: 2, body: 3000, copied: 0),  // the prefix cut 2 + 2: the body lent in place
        (cut: 4 + 300, body: 800, copied: 800),  // the body cut, under 1 KiB: a stack copy
        (cut: 4 + 1000, body: 3000, copied: 3000),  // the body cut, over 1 KiB: readFrame's copy
        (cut: 2, body: 0, copied: 0),  // an empty body after a prefix cut 2 + 2
    ])
    func framesCutAcrossReceiveBuffersAreLentWhole(cut: Int, body: Int, copied: Int) throws {
        let a = pattern(100, seed: 1)
        let b = pattern(body, seed: 2)
        let stream = frame(a) + frame(b)
        let first = frame(a).count + cut
        var waits = 0
        let harness = try LoopHarness(
            stream: stream, stagingCapacity: 256 << 10, maxFrameLength: 1 << 20,
            onWait: { _ in
                waits += 1
                return waits == 1 ? .segments([first, stream.count - first]) : .end
            },
            onLargeRead: { capacity, _ in .progress(capacity) })
        harness.interleaveSegments = true
        #expect(try harness.withNextFrame(prefix: .uint32(.bigEndian)) == a)
        #expect(harness.bufferedCount == 4 + body, "frame B is all received before the call")
        let before = harness.statistics
        #expect(try harness.withNextFrame(prefix: .uint32(.bigEndian)) == b)
        let after = harness.statistics
        #expect(after.bytesCopied - before.bytesCopied == copied)
        #expect(after.bytesDelivered - before.bytesDelivered == body)
        #expect(try harness.withNextFrame(prefix: .uint32(.bigEndian)) == nil)
    }
}
