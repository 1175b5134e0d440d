import Synchronization
import SystemPackage
import Testing

@testable import ExactIO

// What runs where epoll, eventfd, splice and io_uring are missing: the blocking reader on
// read(2), and the loop on poll(2) with its wakeup pipe. Written against POSIX only (no Linux
// interface, no Linux-only test helper), so that this target builds and runs on macOS too; on
// Linux CI runs it with the rest of the suite (the loop on `.poll` by request).

/// A connected pair of stream sockets (AF_UNIX), both blocking.
func portableSocketPair() throws -> (FileDescriptor, FileDescriptor) {
    var fds: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Platform.streamSocketType, 0, &fds) == 0 else { throw Errno(rawValue: errno) }
    return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
}

/// `bytes` as frames of a 4-byte big-endian length and the body.
func portableFrames(_ bodies: [[UInt8]]) -> [UInt8] {
    bodies.flatMap { b in withUnsafeBytes(of: UInt32(b.count).bigEndian, Array.init) + b }
}

/// Bodies from 0 bytes to 200 KB (large ones go straight into their own memory on the loop).
func portableBodies(_ seed: Int, count: Int = 24) -> [[UInt8]] {
    var x = UInt64(seed) &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { k in
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        let size = k % 6 == 5 ? Int(x % 200_000) : Int(x % 2000)
        return (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ k &+ seed) }
    }
}

/// A writer whose reader went away gets EPIPE, not a signal that ends the test process.
let sigpipeIgnored: Void = {
    _ = signal(SIGPIPE, SIG_IGN)
}()

/// Writes `bytes` to `fd` on a thread of its own (a blocking write must not hold a task's
/// thread), in chunks of up to 7,000 bytes, then closes `fd`.
func portableWriter(_ fd: FileDescriptor, _ bytes: [UInt8]) throws {
    _ = sigpipeIgnored
    let thread = try Platform.spawnThread {
        var at = 0
        bytes.withUnsafeBytes { p in
            while at < p.count {
                let n = write(fd.rawValue, p.baseAddress! + at, min(7000, p.count - at))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                at += n
            }
        }
        try? fd.close()
    }
    pthread_detach(thread)  // nobody joins it (ThreadSanitizer reports a thread never joined or detached)
}

@Suite struct PortableReaderTests {
    @Test func theBlockingReaderReadsFramesFromAPipeWithReadTwo() throws {
        let p = try FileDescriptor.pipe()
        defer { try? p.readEnd.close() }
        let bodies = portableBodies(1)
        _ = try portableWriter(p.writeEnd, portableFrames(bodies))
        let reader = try ExactReader(p.readEnd, options: .init(backend: .posix, stagingCapacity: 64 << 10))
        #expect(reader.backend == .posix)
        var got: [[UInt8]] = []
        while let f = try reader.readFrame() { got.append(Array(f)) }
        #expect(got == bodies)
        #expect(reader.isAtEOF)
    }
}

@Suite struct PollLoopTests {
    @Test func aPollLoopSaysWhatItWaitsWith() async throws {
        let loop = try IOLoop(options: .init(backend: .posix, events: .poll))
        #expect(loop.backend == .posix)
        #expect(loop.eventInterface == .poll)
        #expect(loop.waker.kind == .pipe)
        await loop.shutdown()
        #if os(Linux)
        let epoll = try IOLoop(options: .init(backend: .posix, events: .epoll))
        #expect(epoll.eventInterface == .epoll)
        #expect(epoll.waker.kind == .eventfd)
        await epoll.shutdown()
        #else
        #expect(throws: ExactReader.InvalidOptionError.self) { try IOLoop(options: .init(events: .epoll)) }
        #endif
    }

    @Test func framesOnManyConnectionsArriveWhole() async throws {
        let loop = try IOLoop(options: .init(backend: .posix, events: .poll))
        let connections = 24
        let failures = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<connections {
                let (r, w) = try portableSocketPair()
                let bodies = portableBodies(i)
                _ = try portableWriter(w, portableFrames(bodies))
                group.addTask {
                    defer { try? r.close() }
                    let reader = try AsyncExactReader(r, loop: loop, options: .init(stagingCapacity: 64 << 10))
                    var got: [[UInt8]] = []
                    for try await f in reader.frames() { got.append(Array(f)) }
                    return got == bodies ? 0 : 1
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(failures == 0)
        let stats = loop.statistics
        #expect(stats.enters > 0 && stats.reads > 0)
        await loop.shutdown()
    }

    @Test func acceptedConnectionsAreServed() async throws {
        let loop = try IOLoop(options: .init(backend: .posix, events: .poll))
        // A TCP listener on the loopback interface, on a port the kernel picks.
        let group = try IOLoopGroup(count: 1, options: .init(backend: .posix, events: .poll))
        let listener = try group.listen(host: "127.0.0.1", port: 0)[0]
        defer { try? listener.close() }
        var addr = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener.rawValue, $0, &len) } }
        let clients = 8
        for i in 0..<clients {
            let fd = Platform.streamSocket(domain: AF_INET)
            let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, len) } }
            #expect(ok == 0)
            _ = try portableWriter(FileDescriptor(rawValue: fd), portableFrames([[UInt8(i)], portableBodies(i, count: 1)[0]]))
        }
        var served = 0
        for try await conn in loop.connections(accepting: listener) {
            defer { try? conn.close() }
            let reader = try AsyncExactReader(conn, loop: loop)
            let first = try await reader.readFrame()
            #expect(first?.count == 1)
            let tag = Int(first![0])
            #expect(try await reader.readFrame().map(Array.init) == portableBodies(tag, count: 1)[0])
            #expect(try await reader.readFrame() == nil)
            served += 1
            if served == clients { break }
        }
        #expect(served == clients)
        await group.shutdown()
        await loop.shutdown()
    }

    @Test func shutdownEndsAPendingReadAndCancellationLosesNothing() async throws {
        let loop = try IOLoop(options: .init(backend: .posix, events: .poll))
        let (r, w) = try portableSocketPair()
        defer { try? r.close(); try? w.close() }
        // The reader moves into a task and back once that task is over (the compiler cannot see
        // it: an AsyncExactReader is not Sendable, so that two tasks cannot share it).
        nonisolated(unsafe) let reader = try AsyncExactReader(r, loop: loop)
        // Cancelled mid-frame: the bytes that came stay buffered, the next read gets them.
        let head: [UInt8] = [0, 0, 0, 5, 1, 2]
        _ = try w.writeAll(head)
        let pending = Task { try await reader.readFrame() }
        try await Task.sleep(for: .milliseconds(50))
        pending.cancel()
        await #expect(throws: CancellationError.self) { try await pending.value }
        _ = try w.writeAll([3, 4, 5])
        #expect(try await reader.readFrame().map(Array.init) == [1, 2, 3, 4, 5])
        // A read pending at shutdown fails, never hangs.
        let late = Task { try await reader.readFrame() }
        try await Task.sleep(for: .milliseconds(50))
        await loop.shutdown()
        await #expect(throws: (any Error).self) { try await late.value }
    }
}

/// Runs `body` on a thread of its own (a blocking peer must not hold one of the few threads of
/// the cooperative pool) and returns its result once it is done, without blocking a task.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    let result = Mutex<Result<T, any Error>?>(nil)
    let thread = try Platform.spawnThread {
        let r = Result { try body() }
        result.withLock { $0 = r }
    }
    pthread_detach(thread)
    while true {
        if let r = result.withLock({ $0 }) { return try r.get() }
        try await Task.sleep(for: .milliseconds(5))
    }
}

/// AsyncExactWriter on the poll(2) loop (and, where it exists, epoll): sends tried at once,
/// then waiting for POLLOUT while the socket is full, and a reader and a writer sharing one
/// connection (one watch for POLLIN|POLLOUT).
@Suite struct PollWriterTests {
    static let interfaces = [IOLoop.EventInterface.poll] + (IOLoop.EventInterface.epoll.isAvailable ? [.epoll] : [])

    @Test(arguments: interfaces)
    func largeWritesWaitForRoomAndArriveWhole(events: IOLoop.EventInterface) async throws {
        let loop = try IOLoop(options: .init(backend: .posix, events: events))
        let (r, w) = try portableSocketPair()
        defer { try? r.close(); try? w.close() }
        let writer = try AsyncExactWriter(w, loop: loop)
        // 8 MiB: far more than a socket buffer holds, so most of it goes out after POLLOUT.
        let bodies = (0..<8).map { k in [UInt8]((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ k) }) }
        async let received = onThread { () -> [[UInt8]] in
            let reader = try ExactReader(r, options: .init(backend: .posix))
            var got: [[UInt8]] = []
            while got.count < bodies.count, let f = try reader.readFrame() {
                got.append(Array(f))
                usleep(2000)  // a slow peer: the writer's socket fills up
            }
            return got
        }
        for body in bodies { try await writer.writeFrame(ByteView(body)) }
        #expect(try await received == bodies)
        #expect(loop.statistics.sends > 0)
        await loop.shutdown()
    }

    @Test(arguments: interfaces)
    func aReaderAndAWriterShareAConnection(events: IOLoop.EventInterface) async throws {
        let loop = try IOLoop(options: .init(backend: .posix, events: events))
        let (mine, peer) = try portableSocketPair()
        defer { try? peer.close() }
        // The peer echoes each frame back until the end of the stream.
        async let echoed = onThread { () -> Int in
            let reader = try ExactReader(peer, options: .init(backend: .posix))
            var n = 0
            while let f = try reader.readFrame() {
                _ = try peer.writeAll(portableFrames([Array(f)]))
                n += 1
            }
            return n
        }
        let bodies = portableBodies(7, count: 12)
        try await loop.withConnection(mine) { reader, writer in
            for body in bodies {
                try await writer.writeFrame(ByteView(body))
                #expect(try await reader.readFrame().map(Array.init) == body)
            }
            try await writer.finish()  // the peer's reader sees the end and stops echoing
        }
        #expect(try await echoed == bodies.count)
        await loop.shutdown()
    }
}

@Suite struct WakerTests {
    @Test(arguments: [Waker.Kind.pipe] + (Waker.platformKind == .eventfd ? [.eventfd] : []))
    func wakesFromManyThreadsAreOneWakeupAndAClosedWakerIsSilent(kind: Waker.Kind) async throws {
        let waker = try Waker(kind: kind)
        var pfd = pollfd(fd: waker.descriptor, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 0) == 0, "not readable before a wake")
        // More wakes than a pipe holds bytes of: a full pipe still means "woken", never a block.
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<8 { group.addTask { for _ in 0..<20_000 { waker.wake() } } }
        }
        #expect(poll(&pfd, 1, 0) == 1, "readable after wakes")
        waker.drain()
        pfd.revents = 0
        #expect(poll(&pfd, 1, 0) == 0, "one drain takes every pending wake")
        waker.wake()
        waker.wait(milliseconds: 1000)  // returns at once, and drains
        #expect(poll(&pfd, 1, 0) == 0)
        waker.close()
        waker.wake()  // after close: nothing, and no crash
        waker.drain()
        waker.close()
    }

    @Test func theEventsVariableChoosesForAutomaticOnly() {
        typealias E = IOLoop.EventInterface
        #expect(E.resolve(.automatic, environment: ["EXACTIO_EVENTS": "poll"]).interface == .poll)
        #expect(E.resolve(.epoll, environment: ["EXACTIO_EVENTS": "poll"]).interface == .epoll)
        #expect(E.resolve(.poll, environment: [:]).interface == .poll)
        let odd = E.resolve(.automatic, environment: ["EXACTIO_EVENTS": "kqueue"])
        #expect(odd.note?.contains("not understood") == true)
        #if os(Linux)
        #expect(E.resolve(.automatic, environment: [:]).interface == .epoll)
        #expect(odd.interface == .epoll)
        #else
        #expect(E.resolve(.automatic, environment: [:]).interface == .poll)
        #expect(E.resolve(.automatic, environment: ["EXACTIO_EVENTS": "epoll"]).note != nil)
        #endif
        #expect("\(E.automatic) \(E.epoll) \(E.poll)" == "automatic epoll poll")
    }
}
