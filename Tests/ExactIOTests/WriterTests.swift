import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization
import SystemPackage
import Testing
@_spi(Testing) @testable import ExactIO

// AsyncExactWriter on both loop backends: every size, gathered views, frames read back by
// AsyncExactReader, a peer that stops reading (backpressure, deadline), resets, cancellation,
// zero-copy (held until the notification; the fallback when refused), a 1 GiB relay through two
// loops, and withConnection's scope.

/// 64 MiB of pattern bytes, made once (views of it are the writes' bodies).
let writerPattern: ByteView = ByteView(pattern(64 << 20, seed: 4242))

/// Reads `fd` on a thread until the end of the stream (or `limit` bytes), optionally only after
/// `resume()`; `bytes` holds what arrived.
final class Collector: @unchecked Sendable {
    // @unchecked Sendable: `data` and `received` are guarded by `lock`.
    private let lock = NSLock()
    private var data: [UInt8] = []
    private var received = 0
    private let go = DispatchSemaphore(value: 0)
    private var thread: Writer! = nil

    init(_ fd: FileDescriptor, paused: Bool = false, limit: Int = .max, keep: Bool = true, close: Bool = true) {
        if !paused { go.signal() }
        thread = Writer { [self] in
            go.wait()
            defer { if close { try? fd.close() } }
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var total = 0
            while total < limit {
                let n = buffer.withUnsafeMutableBytes { read(fd.rawValue, $0.baseAddress!, min($0.count, limit - total)) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                total += n
                lock.lock()
                if keep { data.append(contentsOf: buffer[0..<n]) }
                received += n
                lock.unlock()
            }
        }
    }

    func resume() { go.signal() }
    func finished() async { await thread.finished() }
    var count: Int { lock.withLock { received } }
    var bytes: [UInt8] { lock.withLock { data } }
}

/// Whether `got` holds exactly the bytes of `views`, in order (memcmp: debug builds compare
/// arrays slowly).
func holds(_ got: [UInt8], _ views: [ByteView]) -> Bool {
    guard got.count == views.reduce(0, { $0 + $1.count }) else { return false }
    var offset = 0
    return got.withUnsafeBytes { g in
        for v in views {
            let same = v.withUnsafeBytes { b in b.count == 0 || memcmp(g.baseAddress! + offset, b.baseAddress!, b.count) == 0 }
            if !same { return false }
            offset += v.count
        }
        return true
    }
}

/// Fills the socket's send buffer (and the peer's receive buffer) with a tiny SO_SNDBUF/RCVBUF so
/// that a write blocks quickly.
func smallBuffers(_ fd: FileDescriptor) {
    var size: Int32 = 16 << 10
    setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
}

/// The error a failed write threw, split into what went out and why the rest did not.
func splitWriteError(_ error: any Error) -> (sent: Int, underlying: any Error) {
    if let e = error as? AsyncExactWriter.WriteError { return (e.sent, e.underlying) }
    return (0, error)
}

@Suite struct WriterTests {
    static let combos: [(ExactReader.Backend, Transport)] = testBackends.flatMap { b in [(b, .unix), (b, .tcp)] }

    /// Every size from 1 B to 64 MiB (powers of two and their neighbours up to 1 MiB, then a few
    /// odd large ones and 64 MiB), as views, copies of buffers and copies of arrays, each from
    /// its own place in the pattern: the peer gets exactly their concatenation, and the counters
    /// say what went and what was copied.
    @Test(arguments: combos)
    func writesOfEverySize(backend: ExactReader.Backend, transport: Transport) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = transport == .tcp ? try tcpPair() : try socketPair(AF_UNIX)
        defer { try? mine.close() }
        var sizes: [Int] = []
        for p in 0...20 {
            sizes.append(1 << p)
            sizes.append((1 << p) + 1)
            if p >= 2 { sizes.append((1 << p) - 1) }
        }
        sizes += [3 << 20, (4 << 20) + 3, (16 << 20) - 1, 64 << 20]
        var views: [ByteView] = []
        let collector = Collector(peer)
        let writer = try AsyncExactWriter(mine, loop: loop)
        var copied = 0
        for (k, n) in sizes.enumerated() {
            let start = n == 64 << 20 ? 0 : (k * 7919) % ((64 << 20) - n)
            let v = writerPattern.subview(start..<(start + n))
            views.append(v)
            switch k % 3 {
            case 0:
                try await writer.write(v)
            case 1:
                try await writer.write(copying: v.storage)  // `views` keeps the memory alive
                copied += n
            default:
                if n < 1 << 20 {
                    try await writer.write(copying: Array(v))
                } else {
                    try await writer.write(copying: v)  // a view is a Sequence<UInt8> too
                }
                copied += n
            }
        }
        try await writer.finish()
        await collector.finished()
        let total = sizes.reduce(0, +)
        #expect(collector.count == total)
        #expect(holds(collector.bytes, views))
        #expect(writer.statistics.bytesSent == total)
        #expect(writer.statistics.bytesCopied == copied)
        #expect(writer.statistics.bytesSentZeroCopy == 0)  // a peer on this host: never (automatic)
        await loop.shutdown()
    }

    /// Views gathered in one write go out in one sendmsg (the socket has room), in order, empty
    /// views skipped; many views (more than one sendmsg takes) all arrive.
    @Test(arguments: testBackends)
    func gatheredViewsGoOutInOneSend(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try socketPair(AF_UNIX)
        defer { try? mine.close() }
        let collector = Collector(peer)
        let writer = try AsyncExactWriter(mine, loop: loop)
        let parts = [ByteView([1, 2, 3]), ByteView(), writerPattern.subview(100..<1100), ByteView([9]), writerPattern.subview(5..<6)]
        try await writer.write(parts)
        #expect(writer.statistics.sends == 1)
        #expect(writer.statistics.bytesSent == 1005)
        // 3,000 views: past IOV_MAX (1,024 per sendmsg), still every byte in order.
        let many = (0..<3000).map { k in writerPattern.subview((k * 13)..<(k * 13 + 1 + k % 50)) }
        try await writer.write(many)
        #expect(writer.statistics.sends >= 4)
        try await writer.finish()
        await collector.finished()
        #expect(holds(collector.bytes, parts + many))
        await loop.shutdown()
    }

    /// writeFrame with every prefix, read back by an AsyncExactReader on the same loop: the
    /// same bodies; a body too long for its prefix is refused before anything is sent.
    @Test(arguments: testBackends)
    func writeFrameRoundTripsThroughTheReader(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, theirs) = try socketPair(AF_UNIX)
        defer {
            try? mine.close()
            try? theirs.close()
        }
        let prefixes: [LengthPrefix] = [
            .uint8, .uint16(.bigEndian), .uint16(.littleEndian), .uint32(.bigEndian), .uint32(.littleEndian),
            .uint64(.bigEndian), .uint64(.littleEndian), .varint,
        ]
        let sizes = [0, 1, 200, 255, 65_535, 70_000, 3 << 20]
        var plan: [(LengthPrefix, ByteView)] = []
        for prefix in prefixes {
            for (k, n) in sizes.enumerated() {
                if prefix == .uint8 && n > 255 || (prefix == .uint16(.bigEndian) || prefix == .uint16(.littleEndian)) && n > 65_535 { continue }
                plan.append((prefix, writerPattern.subview((k * 101)..<(k * 101 + n))))
            }
        }
        let readPlan = plan.map(\.0)
        // The reader runs at once with the writer (a 3 MiB frame does not fit the sockets).
        let reading = Task {
            let reader = try AsyncExactReader(theirs, loop: loop, options: .init(maxFrameLength: 8 << 20))
            var got: [ByteView?] = []
            for prefix in readPlan { got.append(try await reader.readFrame(prefix: prefix)) }
            return got
        }
        let writer = try AsyncExactWriter(mine, loop: loop)
        await #expect(throws: Errno.messageTooLong) { try await writer.writeFrame(writerPattern.subview(0..<256), prefix: .uint8) }
        await #expect(throws: Errno.messageTooLong) { try await writer.writeFrame(writerPattern.subview(0..<65_536), prefix: .uint16(.bigEndian)) }
        for (prefix, body) in plan { try await writer.writeFrame(body, prefix: prefix) }
        let got = try await reading.value
        #expect(got.count == plan.count)
        for (g, (prefix, body)) in zip(got, plan) { #expect(g == body, "prefix \(prefix), \(body.count) bytes") }
        #expect(writer.statistics.bytesCopied == 0)
        await loop.shutdown()
    }

    /// A peer that stops reading: the write waits (it does not return, and the writer copies no
    /// more than its bound for a 64 MiB copying write), then its deadline fires (Errno.timedOut
    /// inside a WriteError saying how much went); the peer gets exactly those bytes. A second
    /// writer's 64 MiB view goes through once the peer reads again.
    @Test(arguments: testBackends)
    func aPeerThatStopsReadingMakesTheWriteWaitUntilItsDeadline(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try tcpPair()
        defer { try? mine.close() }
        smallBuffers(mine)
        smallBuffers(peer)
        let collector = Collector(peer, paused: true)
        let writer = try AsyncExactWriter(mine, loop: loop, options: .init(maxOutstandingBytes: 64 << 10, writeTimeout: .milliseconds(400)))
        let big = writerPattern
        let t0 = ContinuousClock.now
        var sent = -1
        do {
            try await writer.write(copying: big)
            Issue.record("the write returned while the peer read nothing")
        } catch {
            let (k, underlying) = splitWriteError(error)
            sent = k
            #expect(underlying as? Errno == .timedOut)
        }
        #expect(ContinuousClock.now - t0 >= .milliseconds(400))
        #expect(sent > 0 && sent < big.count)
        #expect(writer.statistics.bytesSent == sent)
        // The copy was made a bounded piece at a time: never more than the bound copied ahead.
        #expect(writer.statistics.bytesCopied <= sent + (64 << 10))
        // Backpressure without a deadline: a view write waits while the peer does not read, and
        // completes once it does.
        let second = try AsyncExactWriter(mine, loop: loop)
        let tail = big.subview(0..<(8 << 20))
        let done = Locked(false)
        let resumed = Task {
            try await Task.sleep(for: .milliseconds(300))
            #expect(!done.withLock { $0 }, "the write returned while the peer read nothing")
            collector.resume()
        }
        try await second.write(tail)
        done.withLock { $0 = true }
        try await resumed.value
        try await second.finish()
        await collector.finished()
        #expect(holds(collector.bytes, [big.subview(0..<sent), tail]))
        await loop.shutdown()
    }

    /// A peer that resets the connection while a 64 MiB write is under way: the write fails with
    /// connectionReset or brokenPipe (a WriteError with the bytes that went), never SIGPIPE.
    @Test(arguments: testBackends)
    func aPeerThatResetsMidWriteFailsTheWrite(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try tcpPair()
        defer { try? mine.close() }
        let resetter = Writer {
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var got = 0
            while got < 2 << 20 {
                let n = read(peer.rawValue, &buffer, buffer.count)
                if n <= 0 { break }
                got += n
            }
            var linger = linger(l_onoff: 1, l_linger: 0)  // close with RST
            setsockopt(peer.rawValue, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
            try peer.close()
        }
        let writer = try AsyncExactWriter(mine, loop: loop)
        do {
            try await writer.write(writerPattern)
            Issue.record("the write succeeded although the peer reset the connection")
        } catch {
            let (sent, underlying) = splitWriteError(error)
            #expect(sent >= 2 << 20 && sent < writerPattern.count)
            let e = underlying as? Errno
            #expect(e == .connectionReset || e == .brokenPipe, "\(underlying)")
        }
        await resetter.finished()
        // The next write sees the broken connection at once.
        await #expect(throws: Errno.self) { try await writer.write(copying: [1, 2, 3]) }
        await loop.shutdown()
    }

    /// Writing to a peer that closed never raises SIGPIPE: a child process with SIGPIPE's default
    /// action (death) writes to a closed peer on each backend and exits normally.
    @Test func aClosedPeerNeverRaisesSIGPIPE() async {
        await #expect(processExitsWith: .success) {
            signal(SIGPIPE, SIG_DFL)
            for backend in testBackends {
                let loop = try IOLoop(options: .init(backend: backend))
                for useTCP in [false, true] {
                    let (mine, peer) = useTCP ? try tcpPair() : try socketPair(AF_UNIX)
                    try peer.close()
                    let writer = try AsyncExactWriter(mine, loop: loop)
                    var failed = false
                    for _ in 0..<3 {
                        do { try await writer.write(writerPattern.subview(0..<(1 << 20))) } catch { failed = true }
                    }
                    if !failed { exit(3) }
                    try mine.close()
                }
                await loop.shutdown()
            }
        }
    }

    /// Cancelling the task of a write under way (the peer does not read): the write ends with
    /// CancellationError inside a WriteError saying how much went; the peer gets exactly those
    /// bytes (nothing twice, nothing lost), and the next write continues the stream.
    @Test(arguments: testBackends)
    func cancellationMidWriteReportsWhatWentAndNothingTwice(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try tcpPair()
        defer { try? mine.close() }
        smallBuffers(mine)
        let collector = Collector(peer, paused: true)
        let big = writerPattern.subview(0..<(32 << 20))
        let box = UncheckedBox(try AsyncExactWriter(mine, loop: loop))
        let outcome = Locked<(Int, (any Error)?)>((0, nil))
        let task = Task {
            do {
                try await box.value.write(big)
                outcome.withLock { $0 = (big.count, nil) }
            } catch {
                outcome.withLock { $0 = splitWriteError(error) }
            }
        }
        try await Task.sleep(for: .milliseconds(200))
        task.cancel()
        await task.value
        let sameWriter = box.value
        let (sent, underlying) = outcome.withLock { $0 }
        #expect(underlying is CancellationError, "\(String(describing: underlying))")
        #expect(sent > 0 && sent < big.count)
        #expect(sameWriter.statistics.bytesSent == sent)
        // The stream goes on where it stopped.
        collector.resume()
        let more = writerPattern.subview((40 << 20)..<(41 << 20))
        try await sameWriter.write(more)
        try await sameWriter.finish()
        await collector.finished()
        #expect(collector.count == sent + more.count)
        #expect(holds(collector.bytes, [big.subview(0..<sent), more]))
        await loop.shutdown()
    }

    /// A write pending at the loop's shutdown ends (Errno.canceled, in a WriteError when part
    /// went), never hangs; writes after it fail at once.
    @Test(arguments: testBackends)
    func shutdownEndsAPendingWrite(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try tcpPair()
        defer {
            try? mine.close()
            try? peer.close()
        }
        let writer = try AsyncExactWriter(mine, loop: loop)
        let stopper = Task {
            try await Task.sleep(for: .milliseconds(200))
            await loop.shutdown()
        }
        do {
            try await writer.write(writerPattern)
            Issue.record("the write succeeded although nobody read")
        } catch {
            #expect(splitWriteError(error).underlying as? Errno == .canceled)
        }
        try await stopper.value
        await #expect(throws: Errno.canceled) { try await writer.write(copying: [1]) }
    }

    /// A reader and a writer of one connection at once (withConnection: one registration, one
    /// descriptor): an echo of 24 MiB of frames while the peer writes and reads concurrently, so
    /// that both directions fill up (on epoll: EPOLLIN and EPOLLOUT on one descriptor).
    @Test(arguments: combos)
    func aReaderAndAWriterOfOneConnectionRunConcurrently(backend: ExactReader.Backend, transport: Transport) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = transport == .tcp ? try tcpPair() : try socketPair(AF_UNIX)
        let bodies = (0..<96).map { k in writerPattern.subview((k * 4099)..<(k * 4099 + 1000 + (k * 7919) % (500 << 10))) }
        let sent = bodies.flatMap { frame(Array($0)) }
        let feeder = Writer {
            try sent.withUnsafeBytes { try writeAll(peer, $0) }
            shutdown(peer.rawValue, Int32(SHUT_WR))
        }
        let echo = Collector(peer, close: false)
        let descriptors = loop.statistics
        try await loop.withConnection(mine) { reader, writer in
            for try await f in reader.frames() {
                try await writer.writeFrame(f)
            }
            try await writer.finish()
        }
        await feeder.finished()
        await echo.finished()
        try? peer.close()
        #expect(echo.count == sent.count)
        #expect(echo.bytes == sent)
        #expect(loop.statistics.sends > descriptors.sends)
        await loop.shutdown()
    }

    /// A write that waits for room while the same connection's reader waits for bytes (its
    /// receive armed all along): on epoll one registration with EPOLLIN and EPOLLOUT at once.
    @Test(arguments: testBackends)
    func aWriteWaitsForRoomWhileTheReaderWaitsForBytes(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try socketPair(AF_UNIX)
        let big = writerPattern.subview(0..<(8 << 20))
        let peerSide = Writer {
            defer { try? peer.close() }
            usleep(300_000)  // the write fills the socket and waits meanwhile
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var got = 0
            while got < big.count {
                let n = read(peer.rawValue, &buffer, min(buffer.count, big.count - got))
                if n <= 0 { throw Errno(rawValue: errno) }
                got += n
            }
            try frame([1, 2, 3]).withUnsafeBytes { try writeAll(peer, $0) }
        }
        let box = UncheckedBox<AsyncExactReader?>(nil)
        try await loop.withConnection(mine) { reader, writer in
            box.value = reader
            let pending = Task { try await box.value!.readFrame() }  // the receive stays armed
            try await Task.sleep(for: .milliseconds(50))
            try await writer.write(big)
            let f = try await pending.value
            #expect(f == ByteView([1, 2, 3]))
            box.value = nil
        }
        await peerSide.finished()
        await loop.shutdown()
    }

    /// withConnection closes the connection when its body throws: the peer reads what was
    /// written, then the end of the stream, at once; the error comes out. And when it returns,
    /// its value comes out and the peer sees the end too.
    @Test(arguments: testBackends)
    func withConnectionClosesWhenItsBodyThrowsOrReturns(backend: ExactReader.Backend) async throws {
        struct Boom: Error {}
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        for throwing in [true, false] {
            let (mine, peer) = try socketPair(AF_UNIX)
            defer { try? peer.close() }
            // The peer writes a frame, so the reader has a receive armed when the scope ends.
            try frame([7, 7]).withUnsafeBytes { try writeAll(peer, $0) }
            do {
                let value = try await loop.withConnection(mine) { reader, writer -> Int in
                    let f = try await reader.readFrame()
                    #expect(f == ByteView([7, 7]))
                    try await writer.write(copying: [1, 2, 3])
                    if throwing { throw Boom() }
                    return 42
                }
                #expect(!throwing && value == 42)
            } catch is Boom {
                #expect(throwing)
            }
            // Everything the loop held is closed: the peer reads the bytes, then the end, within
            // a short wait (not after a timeout).
            var pfd = pollfd(fd: peer.rawValue, events: Int16(POLLIN), revents: 0)
            var got: [UInt8] = []
            var ended = false
            for _ in 0..<50 where !ended {
                guard poll(&pfd, 1, 100) > 0 else { continue }
                var buffer = [UInt8](repeating: 0, count: 64)
                let n = read(peer.rawValue, &buffer, buffer.count)
                if n <= 0 { ended = true } else { got += buffer[0..<n] }
            }
            #expect(got == [1, 2, 3])
            #expect(ended, "the peer did not see the end of the stream: the connection stayed open")
        }
        await loop.shutdown()
    }

    /// The loop's own duplicate of a withConnection descriptor is gone once it returns (no
    /// descriptor leaks, the reader with a receive armed included).
    @Test(arguments: testBackends)
    func withConnectionLeavesNoDescriptorBehind(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try tcpPair()
        defer { try? peer.close() }
        let port = localPort(mine)
        _ = try? await loop.withConnection(mine) { reader, writer in
            try await writer.write(copying: [1])
            _ = reader.bufferedCount  // arms a receive: pending when the body throws
            try await Task.sleep(for: .milliseconds(50))
            throw CancellationError()
        }
        #expect(openSocketsOnLocalPort(port) == 0)
        await loop.shutdown()
    }

    // MARK: - Zero-copy (io_uring)

    /// A view sent zero-copy stays held until the kernel's notification: with notifications
    /// held back (the seam), the view's memory (a frame of the loop's frame memory) stays
    /// referenced although the caller dropped it and the peer read every byte, and the loop's
    /// next frame does not reuse it; once notifications flow, it is released.
    @Test(.enabled(if: uringAvailable))
    func aZeroCopyViewIsHeldUntilTheNotification() async throws {
        let loop = try IOLoop(options: .init(backend: .ioUring))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        // The frames come from a peer through an AsyncExactReader: loop frame memory.
        let (inbound, source) = try socketPair(AF_UNIX)
        defer {
            try? inbound.close()
            try? source.close()
        }
        let body = Array(writerPattern.subview(0..<(1 << 20)))
        let feeder = Writer { try (frame(body) + frame(body)).withUnsafeBytes { try writeAll(source, $0) } }
        defer { feeder.join() }
        let reader = try AsyncExactReader(inbound, loop: loop)
        let (mine, peer) = try tcpPair()
        defer { try? mine.close() }
        let collector = Collector(peer, keep: false)
        let writer = try AsyncExactWriter(mine, loop: loop, options: .init(zeroCopyThreshold: 64 << 10))
        loop.holdZeroCopyNotifications(true)
        weak var memory: AnyObject?
        var base: UnsafeRawPointer?
        do {
            let view = try #require(try await reader.readFrame())
            memory = view.owner
            base = view.withUnsafeBytes { UnsafeRawPointer($0.baseAddress) }
            try await writer.write(view)
        }
        #expect(writer.statistics.bytesSentZeroCopy == 1 << 20)
        try await writer.finish()
        await collector.finished()  // the peer has every byte: the kernel is done with them
        try await Task.sleep(for: .milliseconds(100))
        #expect(memory != nil, "the view's memory was released before its notification")
        let next = try #require(try await reader.readFrame())
        #expect(next.withUnsafeBytes { UnsafeRawPointer($0.baseAddress) } != base, "the frame memory was reused before the notification")
        loop.holdZeroCopyNotifications(false)
        for _ in 0..<200 where memory != nil { try await Task.sleep(for: .milliseconds(10)) }
        #expect(memory == nil, "the view's memory was never released")
        await loop.shutdown()
    }

    /// SEND_ZC refused: a unix socket refuses zero-copy (EOPNOTSUPP), and the bytes go out
    /// copying, once refused then copying from the start; a loop told that zero-copy is absent
    /// (as when the probe finds no SEND_ZC) never tries it, where the same writes over TCP go
    /// zero-copy otherwise.
    @Test(.enabled(if: uringAvailable))
    func zeroCopyFallsBackWhenRefused() async throws {
        let loop = try IOLoop(options: .init(backend: .ioUring))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let view = writerPattern.subview(0..<(4 << 20))
        // The socket refuses it.
        do {
            let (mine, peer) = try socketPair(AF_UNIX)
            defer { try? mine.close() }
            let collector = Collector(peer)
            let writer = try AsyncExactWriter(mine, loop: loop, options: .init(zeroCopyThreshold: 1))
            try await writer.write(view)
            try await writer.write(view)
            try await writer.finish()
            await collector.finished()
            #expect(writer.statistics.zeroCopyRefusals == 1)
            #expect(writer.statistics.bytesSentZeroCopy == 0)
            #expect(holds(collector.bytes, [view, view]))
        }
        // TCP takes it.
        do {
            let (mine, peer) = try tcpPair()
            defer { try? mine.close() }
            let collector = Collector(peer)
            let writer = try AsyncExactWriter(mine, loop: loop, options: .init(zeroCopyThreshold: 1))
            try await writer.write(view)
            try await writer.finish()
            await collector.finished()
            #expect(writer.statistics.bytesSentZeroCopy == view.count)
            #expect(holds(collector.bytes, [view]))
        }
        // The probe's refusal.
        loop.refuseZeroCopy()
        do {
            let (mine, peer) = try tcpPair()
            defer { try? mine.close() }
            let collector = Collector(peer)
            let writer = try AsyncExactWriter(mine, loop: loop, options: .init(zeroCopyThreshold: 1))
            try await writer.write(view)
            try await writer.finish()
            await collector.finished()
            #expect(writer.statistics.bytesSentZeroCopy == 0)
            #expect(writer.statistics.zeroCopyRefusals == 0)
            #expect(holds(collector.bytes, [view]))
        }
        await loop.shutdown()
    }

    /// The zero-copy bound: views held for notifications count against maxOutstandingBytes, so
    /// with notifications held back a second write waits (it would pass the bound) until they
    /// flow; the held bytes never pass the bound plus one write.
    @Test(.enabled(if: uringAvailable))
    func heldZeroCopyBytesAreBounded() async throws {
        let loop = try IOLoop(options: .init(backend: .ioUring))
        let dog = watchdog(loop)
        defer { dog.cancel() }
        let (mine, peer) = try tcpPair()
        defer { try? mine.close() }
        let collector = Collector(peer, keep: false)
        let writer = try AsyncExactWriter(mine, loop: loop, options: .init(maxOutstandingBytes: 1 << 20, zeroCopyThreshold: 1))
        loop.holdZeroCopyNotifications(true)
        try await writer.write(writerPattern.subview(0..<(1 << 20)))
        #expect(writer.sender.shared.withLock { $0.pinned } == 1 << 20)
        let released = Task {
            try await Task.sleep(for: .milliseconds(300))
            loop.holdZeroCopyNotifications(false)
        }
        let t0 = ContinuousClock.now
        try await writer.write(writerPattern.subview((1 << 20)..<(2 << 20)))
        #expect(ContinuousClock.now - t0 >= .milliseconds(250), "the second write did not wait for room")
        try await released.value
        try await writer.finish()
        await collector.finished()
        #expect(collector.count == 2 << 20)
        await loop.shutdown()
    }

    /// Automatic zero-copy is off for a peer on this host (measured: it never pays over loopback)
    /// and for unix sockets.
    @Test func automaticZeroCopyIsOffForPeersOnThisHost() throws {
        let (a, b) = try tcpPair()
        let (c, d) = try socketPair(AF_UNIX)
        defer { for fd in [a, b, c, d] { try? fd.close() } }
        #expect(!AsyncExactWriter.peerIsRemote(a))
        #expect(!AsyncExactWriter.peerIsRemote(c))
        #expect(AsyncExactWriter.zeroCopyMinimum(a, .init()) == .max)
        #expect(AsyncExactWriter.zeroCopyMinimum(a, .init(zeroCopyThreshold: 4096)) == 4096)
    }

    // MARK: - Relay

    /// 1 GiB of 1 MiB frames relayed through two loops (source → loop A's reader → its writer →
    /// loop B's reader → its writer → sink) arrives byte-identical; the loops copy nothing in
    /// user space (on io_uring, loop A's writer relays zero-copy).
    @Test(arguments: testBackends)
    func relayOneGiBThroughTwoLoops(backend: ExactReader.Backend) async throws {
        let a = try IOLoop(options: .init(backend: backend))
        let b = try IOLoop(options: .init(backend: backend))
        let dogA = watchdog(a, seconds: 120)
        let dogB = watchdog(b, seconds: 120)
        defer {
            dogA.cancel()
            dogB.cancel()
        }
        let frames = 1024
        let n = 1 << 20
        // Frame k is the pattern from offset k % 997: every frame differs from its neighbours.
        let base = writerPattern
        let (s1, source) = try tcpPair()
        let (s2out, s2in) = try tcpPair()
        let (s3out, sink) = try tcpPair()
        let producer = Writer {
            defer { try? source.close() }
            var header = [UInt8](repeating: 0, count: 4)
            for k in 0..<frames {
                header = [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
                try header.withUnsafeBytes { try writeAll(source, $0) }
                try base.subview((k % 997)..<(k % 997 + n)).withUnsafeBytes { try writeAll(source, $0) }
            }
        }
        let mismatches = Locked(0)
        let received = Locked(0)
        let verifier = Writer {
            defer { try? sink.close() }
            let r = try ExactReader(sink, options: .init(maxFrameLength: 2 << 20))
            var k = 0
            while let f = try r.readFrame() {
                let expected = base.subview((k % 997)..<(k % 997 + n))
                if f != expected { mismatches.withLock { $0 += 1 } }
                k += 1
            }
            received.withLock { $0 = k }
        }
        @Sendable func hop(_ loop: IOLoop, from: FileDescriptor, to: FileDescriptor, zeroCopy: Bool) async throws -> (ExactReader.Statistics, AsyncExactWriter.Statistics) {
            defer {
                try? from.close()
                try? to.close()
            }
            let reader = try AsyncExactReader(from, loop: loop, options: .init(maxFrameLength: 2 << 20))
            let writer = try AsyncExactWriter(to, loop: loop, options: .init(zeroCopyThreshold: zeroCopy ? 64 << 10 : nil))
            for try await f in reader.frames() { try await writer.writeFrame(f) }
            try await writer.finish()
            return (reader.statistics, writer.statistics)
        }
        async let first = hop(a, from: s1, to: s2out, zeroCopy: backend == .ioUring)
        async let second = hop(b, from: s2in, to: s3out, zeroCopy: false)
        let (r1, w1) = try await first
        let (r2, w2) = try await second
        await producer.finished()
        await verifier.finished()
        #expect(received.withLock { $0 } == frames)
        #expect(mismatches.withLock { $0 } == 0)
        #expect(w1.bytesSent == frames * (n + 4) && w2.bytesSent == frames * (n + 4))
        // The writers copy nothing in user space (the readers' copies are the receive path's:
        // the staged part of each large frame).
        #expect(w1.bytesCopied == 0 && w2.bytesCopied == 0)
        #expect(r1.bytesDelivered >= frames * n && r2.bytesDelivered >= frames * n)
        if backend == .ioUring { #expect(w1.bytesSentZeroCopy > 0) }
        await a.shutdown()
        await b.shutdown()
    }
}

/// A value handed between tasks by a test that knows only one uses it at a time.
final class UncheckedBox<T>: @unchecked Sendable {
    // @unchecked Sendable: the test uses the value from one task at a time (it awaits the other).
    var value: T
    init(_ value: T) { self.value = value }
}

/// The local port of a TCP socket.
func localPort(_ fd: FileDescriptor) -> UInt16 {
    var addr = sockaddr_in()
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &len) }
    }
    return UInt16(bigEndian: addr.sin_port)
}
