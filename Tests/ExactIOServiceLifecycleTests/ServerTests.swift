import ExactIO
import ExactIOServiceLifecycle
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Metrics
import MetricsTestKit
import ServiceLifecycle
import ServiceLifecycleTestKit
import Synchronization
import SystemPackage
import Testing

// ExactIOServer: graceful shutdown drains in-flight frames and loses no acknowledged frame; a
// bad connection does not stop the others; idle connections do not hold the shutdown up; the
// grace period ends in cancellation.
//
// The handlers acknowledge each frame with plain send(2) of its 8-byte id (the first 8 bytes
// of its body).

/// The backends to test on this machine (io_uring where it can be had).
let serverBackends: [ExactReader.Backend] = {
    guard let p = try? FileDescriptor.pipe() else { return [.posix] }
    defer {
        try? p.readEnd.close()
        try? p.writeEnd.close()
    }
    return (try? ExactReader(p.readEnd, options: .init(backend: .ioUring))) != nil ? [.posix, .ioUring] : [.posix]
}()

/// A frame: a 4-byte big-endian length, then `id` (8 bytes, big-endian) and `extra` bytes.
func frame(id: UInt64, extra: Int = 100) -> [UInt8] {
    let body = withUnsafeBytes(of: id.bigEndian) { Array($0) } + (0..<extra).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(id)) }
    return withUnsafeBytes(of: UInt32(body.count).bigEndian) { Array($0) } + body
}

/// The id at the start of a frame's body.
func id(of frame: ByteView) -> UInt64 {
    frame.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) }
}

/// Sends all of `bytes` (no SIGPIPE), waiting while a non-blocking socket is full.
func sendAll(_ fd: FileDescriptor, _ bytes: [UInt8]) throws {
    var sent = 0
    while sent < bytes.count {
        let n = bytes[sent...].withUnsafeBytes { send(fd.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n < 0 {
            if errno == EINTR { continue }
            if errno == EAGAIN {
                var p = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1000)
                continue
            }
            throw Errno(rawValue: errno)
        }
        sent += n
    }
}

/// Runs `body` on a thread of its own: the clients' blocking calls must not hold the threads of
/// the cooperative pool, which the server's tasks (and the parallel tests) need.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { c in
        Thread { c.resume(with: Result { try body() }) }.start()
    }
}

/// A blocking client connection to the server (each call on a thread of its own).
struct Client {
    let fd: FileDescriptor

    /// Connects to `port` on 127.0.0.1, or to the unix socket at `path`.
    init(port: UInt16? = nil, path: String? = nil) throws {
        let domain = path == nil ? AF_INET : AF_UNIX
        let s = socket(domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw Errno(rawValue: errno) }
        var timeout = timeval(tv_sec: 300, tv_usec: 0)  // no test hangs for good on a lost ack
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let ok: Bool
        if let path {
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &a.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
            ok = withUnsafePointer(to: &a) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
            }
        } else {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            a.sin_port = port!.bigEndian
            ok = withUnsafePointer(to: &a) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
            }
        }
        guard ok else {
            let e = Errno(rawValue: errno)
            _ = Glibc.close(s)
            throw e
        }
        fd = FileDescriptor(rawValue: s)
    }

    func send(_ bytes: [UInt8]) async throws {
        try await offPool { [fd] in try sendAll(fd, bytes) }
    }

    /// The next ack's id; nil when the server closed the connection.
    func ack() async throws -> UInt64? {
        try await offPool { try self.blockingAck() }
    }

    private func blockingAck() throws -> UInt64? {
        var bytes = [UInt8](repeating: 0, count: 8)
        var got = 0
        while got < 8 {
            let n = bytes[got...].withUnsafeMutableBytes { recv(fd.rawValue, $0.baseAddress, $0.count, 0) }
            if n == 0 { return nil }
            if n < 0 {
                if errno == EINTR { continue }
                throw Errno(rawValue: errno)
            }
            got += n
        }
        return bytes.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) }
    }

    /// True when the server closed the connection (end of stream or reset), within the receive
    /// timeout.
    func isClosedByServer() async -> Bool {
        (try? await offPool { self.blockingIsClosedByServer() }) ?? false
    }

    private func blockingIsClosedByServer() -> Bool {
        var byte: UInt8 = 0
        while true {
            let n = recv(fd.rawValue, &byte, 1, 0)
            if n == 0 { return true }
            if n < 0 && errno == EINTR { continue }
            return n < 0 && errno == ECONNRESET
        }
    }

    /// Closes with a reset (SO_LINGER 0).
    func reset() {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        try? fd.close()
    }

    func close() { try? fd.close() }
}

/// What the handlers did: frames processed and acknowledged (by id), handlers running, how
/// handlers ended.
final class Ledger: Sendable {
    struct State {
        var processed: Set<UInt64> = []
        var acked: Set<UInt64> = []
        var running = 0
        var started = 0
        var cancelled = 0
        var sawShutdown = 0
        /// The loop each frame was read on.
        var loopOf: [UInt64: IOLoop] = [:]
    }
    let state = Mutex(State())
    var snapshot: State { state.withLock { $0 } }
}

struct BadFrame: Error {}

/// The test server's handler: frames until the shutdown boundary, each acknowledged with its
/// id; a frame with id 666 makes it throw.
func ackHandler(_ ledger: Ledger, maxFrameLength: Int = 1 << 20) -> @Sendable (ExactIOServer.Connection) async throws -> Void {
    { connection in
        let fd = connection.fileDescriptor
        ledger.state.withLock {
            $0.running += 1
            $0.started += 1
        }
        defer {
            try? fd.close()
            ledger.state.withLock {
                $0.running -= 1
                if connection.isShuttingDown { $0.sawShutdown += 1 }
            }
        }
        do {
            let reader = try AsyncExactReader(fd, loop: connection.loop, options: .init(maxFrameLength: maxFrameLength))
            for try await frame in connection.frames(from: reader) {
                let id = id(of: frame)
                if id == 666 { throw BadFrame() }
                ledger.state.withLock {
                    $0.processed.insert(id)
                    $0.loopOf[id] = connection.loop
                }
                try sendAll(fd, withUnsafeBytes(of: id.bigEndian) { Array($0) })
                ledger.state.withLock { _ = $0.acked.insert(id) }
            }
        } catch is CancellationError {
            ledger.state.withLock { $0.cancelled += 1 }
            throw CancellationError()
        }
    }
}

/// Waits (polling) until `condition` holds, at most `seconds`.
func eventually(_ seconds: Double = 300, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while !condition() && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
}

let quietLogger = Logger(label: "exactio-test") { _ in SwiftLogNoOpLogHandler() }

@Suite struct ServerTests {
    func configuration(
        _ backend: ExactReader.Backend, grace: Duration = .seconds(3600), metrics: TestMetrics? = nil, loops: Int = 2
    ) -> ExactIOServer.Configuration {
        .init(
            endpoint: .tcp(host: "127.0.0.1", port: 0), loopCount: loops, loopOptions: .init(backend: backend),
            gracePeriod: grace, metricsInterval: nil, metricsFactory: metrics)
    }

    /// In a ServiceGroup: a graceful shutdown with a frame half-sent lets that frame arrive
    /// and be acknowledged, ends the connections that wait between frames at once, and ends
    /// the run long before the grace period; every frame acknowledged was processed, and
    /// every frame processed was acknowledged (no handler was cut short).
    @Test(arguments: serverBackends)
    func gracefulShutdownDrainsInFlightFrames(backend: ExactReader.Backend) async throws {
        let ledger = Ledger()
        let metrics = TestMetrics()
        let server = try ExactIOServer(configuration: configuration(backend, metrics: metrics), handler: ackHandler(ledger))
        let port = try #require(server.port)
        let group = ServiceGroup(services: [server], logger: quietLogger)
        let started = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let busy = try Client(port: port)
            let idle = try Client(port: port)
            let done = try Client(port: port)
            defer { [busy, idle, done].forEach { $0.close() } }
            var clientAcked: Set<UInt64> = []
            for i in 1...20 as ClosedRange<UInt64> {
                try await busy.send(frame(id: i))
                clientAcked.insert(try #require(try await busy.ack()))
            }
            for i in 101...105 as ClosedRange<UInt64> {
                try await done.send(frame(id: i))
                clientAcked.insert(try #require(try await done.ack()))
            }
            try await eventually { ledger.snapshot.started == 3 }
            // Frame 21: its length and half its body; once the loop has received some of it
            // (a completion on the connection's loop: the others are quiet), the shutdown.
            let loop = try #require(ledger.snapshot.loopOf[20])
            try await Task.sleep(for: .milliseconds(50))  // the loop publishes its counters once per turn
            let completions = loop.statistics.completions
            let last = frame(id: 21, extra: 10_000)
            try await busy.send(Array(last[..<5000]))
            try await eventually { loop.statistics.completions > completions }
            await group.triggerGracefulShutdown()
            // The connections between frames end now; the one in a frame does not.
            #expect(await idle.isClosedByServer())
            #expect(await done.isClosedByServer())
            // The listeners are closed: new connections are refused (once the loops let go of
            // their duplicates), while the handler in a frame goes on.
            var refused = false
            let patience = ContinuousClock.now + .seconds(300)
            while !refused && ContinuousClock.now < patience {
                do {
                    try Client(port: port).close()
                    try await Task.sleep(for: .milliseconds(10))
                } catch Errno.connectionRefused {
                    refused = true
                }
            }
            #expect(refused)
            #expect(ledger.snapshot.running == 1)
            try await busy.send(Array(last[5000...]))
            clientAcked.insert(try #require(try await busy.ack()))
            #expect(await busy.isClosedByServer(), "the connection ends at the frame boundary after frame 21")
            try await tasks.next()
            // Long before the hour of grace (the whole suite in parallel can starve the
            // cooperative pool for many seconds: no tighter bound), and nothing was cancelled.
            #expect(ContinuousClock.now - started < .seconds(600))
            let s = ledger.snapshot
            #expect(clientAcked == Set(1...21).union(101...105))
            #expect(s.acked == clientAcked)
            #expect(s.processed == s.acked)
            #expect(s.cancelled == 0)
            #expect(s.sawShutdown == 3)
        }
        #expect(try metrics.expectCounter("exactio_connections_accepted").totalValue == 3)
        #expect((try? metrics.expectCounter("exactio_connection_failures").totalValue) ?? 0 == 0)
        #expect(try metrics.expectMeter("exactio_connections_active").lastValue == 0)
        #expect(try metrics.expectCounter("exactio_loop_enters", [("loop", "0")]).totalValue > 0)
        #expect(try metrics.expectCounter("exactio_loop_completions", [("loop", "1")]).totalValue >= 0)
    }

    /// Handlers that throw (a frame the handler refuses, a length past the limit, a peer that
    /// resets mid-frame) end their own connection only: the others go on, new connections are
    /// served, and the run ends normally.
    @Test(arguments: serverBackends)
    func aBadConnectionDoesNotStopTheOthers(backend: ExactReader.Backend) async throws {
        let ledger = Ledger()
        let metrics = TestMetrics()
        let server = try ExactIOServer(
            configuration: configuration(backend, metrics: metrics), handler: ackHandler(ledger, maxFrameLength: 1 << 16))
        let port = try #require(server.port)
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await server.run() }
                let good = try Client(port: port)
                defer { good.close() }
                var next: UInt64 = 1
                func exchange(_ n: Int) async throws {
                    for _ in 0..<n {
                        try await good.send(frame(id: next))
                        #expect(try await good.ack() == next)
                        next += 1
                    }
                }
                try await exchange(10)
                // The handler throws on id 666.
                let refused = try Client(port: port)
                try await refused.send(frame(id: 666))
                #expect(await refused.isClosedByServer())
                refused.close()
                try await exchange(10)
                // A length past maxFrameLength: the reader throws frameTooLarge.
                let huge = try Client(port: port)
                try await huge.send([0x40, 0, 0, 0] + frame(id: 1))
                #expect(await huge.isClosedByServer())
                huge.close()
                try await exchange(10)
                // A reset in the middle of a frame.
                let resetter = try Client(port: port)
                try await resetter.send(Array(frame(id: 7, extra: 50_000)[..<20_000]))
                try await Task.sleep(for: .milliseconds(100))
                resetter.reset()
                try await eventually { (try? metrics.expectCounter("exactio_connection_failures").totalValue) == 3 }
                try await exchange(10)
                // A new connection after the failures is served.
                let late = try Client(port: port)
                defer { late.close() }
                try await late.send(frame(id: 1000))
                #expect(try await late.ack() == 1000)
                trigger.triggerGracefulShutdown()
                try await tasks.next()  // the run ends without an error
            }
        }
        #expect(try metrics.expectCounter("exactio_connection_failures").totalValue == 3)
        #expect(try metrics.expectCounter("exactio_connections_accepted").totalValue == 5)
        #expect(ledger.snapshot.acked == Set(1...40).union([1000]))
        #expect(ledger.snapshot.running == 0)
    }

    /// Connections that send nothing do not hold the shutdown up: each ends at once, and the
    /// run ends long before the grace period.
    @Test(arguments: serverBackends)
    func shutdownWithIdleConnectionsCompletes(backend: ExactReader.Backend) async throws {
        let ledger = Ledger()
        let server = try ExactIOServer(configuration: configuration(backend), handler: ackHandler(ledger))
        let port = try #require(server.port)
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await server.run() }
                let clients = try (0..<20).map { _ in try Client(port: port) }
                defer { clients.forEach { $0.close() } }
                try await eventually { ledger.snapshot.started == 20 }
                #expect(ledger.snapshot.started == 20)
                let t0 = ContinuousClock.now
                trigger.triggerGracefulShutdown()
                try await tasks.next()
                #expect(ContinuousClock.now - t0 < .seconds(600), "long before the hour of grace")
                for c in clients { #expect(await c.isClosedByServer()) }
            }
        }
        #expect(ledger.snapshot.running == 0)
        #expect(ledger.snapshot.cancelled == 0)
        #expect(ledger.snapshot.sawShutdown == 20)
    }

    /// A frame that never completes: at the end of the grace period its handler is cancelled,
    /// and the run ends.
    @Test func theGracePeriodEndsInCancellation() async throws {
        let ledger = Ledger()
        let metrics = TestMetrics()
        let server = try ExactIOServer(
            configuration: configuration(.automatic, grace: .milliseconds(300), metrics: metrics), handler: ackHandler(ledger))
        let port = try #require(server.port)
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await server.run() }
                let stuck = try Client(port: port)
                defer { stuck.close() }
                try await stuck.send(Array(frame(id: 1)[..<50]))
                try await eventually { ledger.snapshot.started == 1 }
                try await Task.sleep(for: .milliseconds(200))
                let t0 = ContinuousClock.now
                trigger.triggerGracefulShutdown()
                try await tasks.next()
                let took = ContinuousClock.now - t0
                #expect(took >= .milliseconds(250) && took < .seconds(600), "\(took)")
                #expect(await stuck.isClosedByServer())
            }
        }
        #expect(ledger.snapshot.cancelled == 1)
        #expect(ledger.snapshot.processed.isEmpty)
        #expect(try metrics.expectCounter("exactio_connections_cancelled").totalValue == 1)
    }

    /// Cancelling the task that runs the server cancels the handlers at once (no grace).
    @Test func cancellingTheRunCancelsTheHandlers() async throws {
        let ledger = Ledger()
        let server = try ExactIOServer(configuration: configuration(.automatic), handler: ackHandler(ledger))
        let port = try #require(server.port)
        let run = Task { try await server.run() }
        let stuck = try Client(port: port)
        defer { stuck.close() }
        try await stuck.send(Array(frame(id: 1)[..<50]))
        try await eventually { ledger.snapshot.started == 1 }
        let t0 = ContinuousClock.now
        run.cancel()
        try await run.value
        #expect(ContinuousClock.now - t0 < .seconds(600), "long before the hour of grace")
        #expect(ledger.snapshot.cancelled == 1)
        #expect(await stuck.isClosedByServer())
    }

    /// A unix-socket server: one listener, connections spread over the loops, the socket file
    /// removed at the end. A server runs once.
    @Test func aUnixSocketServer() async throws {
        let path = "/tmp/exactio-server-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let ledger = Ledger()
        let loops = Mutex<Set<ObjectIdentifier>>([])
        let handler = ackHandler(ledger)
        let server = try ExactIOServer(
            configuration: .init(endpoint: .unix(path: path), loopCount: 2, metricsInterval: .milliseconds(10))
        ) { connection in
            loops.withLock { _ = $0.insert(ObjectIdentifier(connection.loop)) }
            try await handler(connection)
        }
        #expect(server.port == nil)
        #expect(access(path, F_OK) == 0)
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await server.run() }
                for i in 0..<4 as Range<UInt64> {
                    let c = try Client(path: path)
                    defer { c.close() }
                    try await c.send(frame(id: i))
                    #expect(try await c.ack() == i)
                }
                trigger.triggerGracefulShutdown()
                try await tasks.next()
            }
        }
        #expect(loops.withLock { $0.count } == 2, "round-robin over both loops")
        #expect(access(path, F_OK) != 0, "the socket file is removed")
        await #expect(throws: ExactIOServer.AlreadyRunError.self) { try await server.run() }
    }

    /// A taken port fails when the server is created, with the errno; nothing stays open.
    @Test func aTakenPortFailsAtCreation() throws {
        let first = try ExactIOServer(
            configuration: .init(endpoint: .tcp(host: "127.0.0.1", port: 0), loopCount: 1, reusePort: false)) { _ in }
        let port = try #require(first.port)
        #expect(throws: Errno.addressInUse) {
            try ExactIOServer(configuration: .init(endpoint: .tcp(host: "127.0.0.1", port: port), loopCount: 2)) { _ in }
        }
    }

    /// A listener that fails for good (here: shut down under the server, so that accepting
    /// fails with EINVAL) stops the server like a graceful shutdown: accepting ends everywhere,
    /// a handler in a frame finishes it, and run() throws the listener's error.
    @Test(arguments: serverBackends)
    func aFailedListenerStopsTheServerAndIsThrown(backend: ExactReader.Backend) async throws {
        let ledger = Ledger()
        let server = try ExactIOServer(configuration: configuration(backend), handler: ackHandler(ledger))
        let port = try #require(server.port)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await server.run() }
            let busy = try Client(port: port)
            defer { busy.close() }
            try await busy.send(frame(id: 1))
            #expect(try await busy.ack() == 1)
            // Half of frame 2, received by the loop (as in gracefulShutdownDrainsInFlightFrames).
            let loop = try #require(ledger.snapshot.loopOf[1])
            try await Task.sleep(for: .milliseconds(50))
            let completions = loop.statistics.completions
            let last = frame(id: 2, extra: 10_000)
            try await busy.send(Array(last[..<5000]))
            try await eventually { loop.statistics.completions > completions }
            // Every listening socket on the port (the server's and the loops' duplicates): every
            // open descriptor, not the first 4,096 (tests running beside this one hold thousands,
            // and the listener's number was once past 4,096: none found, then this test hung).
            var listening = 0
            let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
            for fd in open.compactMap({ Int32($0) }) {
                var on: Int32 = 0
                var len = socklen_t(4)
                guard getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) == 0, on == 1,
                      (try? IOLoop.localPort(of: FileDescriptor(rawValue: fd))) == port else { continue }
                shutdown(fd, Int32(SHUT_RD))
                listening += 1
            }
            // Required: with no listener shut down the server would never stop, and the group
            // would wait for it (thrown, the group cancels it).
            try #require(listening >= 1)
            try await busy.send(Array(last[5000...]))
            #expect(try await busy.ack() == 2)
            #expect(await busy.isClosedByServer())
            await #expect(throws: Errno.self) { try await tasks.next() }
        }
        #expect(ledger.snapshot.acked == [1, 2])
        #expect(ledger.snapshot.cancelled == 0)
    }
}
