import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import SystemPackage
import Testing
import ExactIOCTestSupport
@_spi(Testing) @testable import ExactIO

// Listening sockets (IOLoop.listen, IOLoopGroup.listen), the scoped forms (withLoop,
// withLoopGroup), and the loop's logger.

/// Connects to `port` on the IPv6 address `host`; the client's descriptor.
func connectTo6(_ host: String, _ port: UInt16) throws -> FileDescriptor {
    let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw Errno(rawValue: errno) }
    var a = sockaddr_in6()
    a.sin6_family = sa_family_t(AF_INET6)
    a.sin6_port = port.bigEndian
    guard inet_pton(AF_INET6, host, &a.sin6_addr) == 1 else { throw Errno.invalidArgument }
    let ok = withUnsafePointer(to: &a) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
    }
    guard ok else {
        let e = Errno(rawValue: errno)
        close(fd)
        throw e
    }
    return FileDescriptor(rawValue: fd)
}

/// The loopback address with `port`.
func loopback(_ port: UInt16) -> sockaddr_in {
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    a.sin_port = port.bigEndian
    return a
}

/// Connects to the unix socket at `path`.
func connectUnix(_ path: String) throws -> FileDescriptor {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw Errno(rawValue: errno) }
    var a = sockaddr_un()
    a.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &a.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
    let ok = withUnsafePointer(to: &a) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
    }
    guard ok else {
        let e = Errno(rawValue: errno)
        close(fd)
        throw e
    }
    return FileDescriptor(rawValue: fd)
}

/// IPv6 works here (a socket on ::1 can be bound): false in containers without it.
let ipv6Available: Bool = {
    let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var a = sockaddr_in6()
    a.sin6_family = sa_family_t(AF_INET6)
    a.sin6_addr = in6addr_loopback
    return withUnsafePointer(to: &a) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
    }
}()

/// Accepts one connection on `listener` with `loop`, reads one frame from it, closes it.
func acceptOneFrame(_ loop: IOLoop, _ listener: FileDescriptor) async throws -> ByteView? {
    var it = loop.connections(accepting: listener).makeAsyncIterator()
    guard let conn = try await it.next() else { return nil }
    defer { try? conn.close() }
    let reader = try AsyncExactReader(conn, loop: loop)
    return try await reader.readFrame()
}

/// A fresh path for a unix socket in the temporary directory.
func tempSocketPath() -> String {
    "/tmp/exactio-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// In an exit test: failing listens leave no descriptor open.
func failedListensLeakNothingChild() throws {
    let taken = try IOLoop.listen(host: "127.0.0.1", port: 0)
    let port = try IOLoop.localPort(of: taken)
    let existing = tempSocketPath()
    let held = try IOLoop.listen(unixPath: existing)
    // Sockets only: what a listen could leave open. The harness and the runtime open other
    // descriptors in the child on threads of their own (a timerfd of Dispatch's, seen here
    // appearing during the loop below).
    func openSockets() -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.count { fd in
            ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + fd)) ?? "").hasPrefix("socket:")
        }
    }
    let before = openSockets()
    for _ in 0..<100 {
        childExpect((try? IOLoop.listen(host: "127.0.0.1", port: port)) == nil, "a taken port was bound")
        childExpect((try? IOLoop.listen(host: "no.such.host", port: 0)) == nil, "a name was resolved")
        childExpect((try? IOLoop.listen(unixPath: existing)) == nil, "an existing socket file was bound over")
        childExpect((try? IOLoop.listen(unixPath: "/nonexistent-dir/x.sock")) == nil, "a missing directory")
        childExpect((try? IOLoop.listen(host: "203.0.113.1", port: 0)) == nil, "an address of another machine was bound")
    }
    let after = openSockets()
    childExpect(after == before, "failing listens left \(after - before) sockets open")
    try held.close()
    unlink(existing)
    try taken.close()
}

@Suite struct ListenTests {
    @Test(arguments: testBackends)
    func anIPv4ListenerOnAPortTheKernelPicks(backend: ExactReader.Backend) async throws {
        let listener = try IOLoop.listen(host: "127.0.0.1", port: 0, backlog: 16)
        defer { try? listener.close() }
        let port = try IOLoop.localPort(of: listener)
        #expect(port != 0)
        #expect(fcntl(listener.rawValue, F_GETFD) & FD_CLOEXEC != 0, "close-on-exec")
        var type: Int32 = 0
        var len = socklen_t(4)
        getsockopt(listener.rawValue, SOL_SOCKET, SO_ACCEPTCONN, &type, &len)
        #expect(type == 1, "listening")
        let loop = try IOLoop(options: .init(backend: backend))
        let client = try connectTo(loopback(port))
        defer { try? client.close() }
        try send(client, frame([1, 2, 3]))
        #expect(try await acceptOneFrame(loop, listener) == ByteView([1, 2, 3]))
        await loop.shutdown()
    }

    @Test func wildcardAndLocalhostForms() async throws {
        try await IOLoop.withLoop { loop in
            for host in ["0.0.0.0", "localhost", "127.0.0.1"] {
                let listener = try IOLoop.listen(host: host, port: 0)
                defer { try? listener.close() }
                let client = try connectTo(loopback(try IOLoop.localPort(of: listener)))
                defer { try? client.close() }
                try send(client, frame(Array(host.utf8)))
                #expect(try await acceptOneFrame(loop, listener) == ByteView(Array(host.utf8)), "\(host)")
            }
        }
    }

    @Test(.enabled(if: ipv6Available)) func ipv6Forms() async throws {
        try await IOLoop.withLoop { loop in
            for host in ["::1", "[::1]", "::"] {
                let listener = try IOLoop.listen(host: host, port: 0)
                defer { try? listener.close() }
                let port = try IOLoop.localPort(of: listener)
                let client = try connectTo6("::1", port)
                defer { try? client.close() }
                try send(client, frame([6]))
                #expect(try await acceptOneFrame(loop, listener) == ByteView([6]), "\(host)")
            }
            // "::" takes IPv4 too (IPV6_V6ONLY off).
            let any = try IOLoop.listen(host: "::", port: 0)
            defer { try? any.close() }
            let client = try connectTo(loopback(try IOLoop.localPort(of: any)))
            defer { try? client.close() }
            try send(client, frame([4]))
            #expect(try await acceptOneFrame(loop, any) == ByteView([4]))
        }
    }

    @Test func errorsAreErrnos() throws {
        for host in ["example.com", "1.2.3", "", "::1%no-such-interface-x", "[::1"] {
            #expect(throws: Errno.invalidArgument, "\(host)") { try IOLoop.listen(host: host, port: 0) }
        }
        #expect(throws: Errno.invalidArgument) { try IOLoop.listen(host: "127.0.0.1", port: 0, backlog: 0) }
        let taken = try IOLoop.listen(host: "127.0.0.1", port: 0)
        defer { try? taken.close() }
        let port = try IOLoop.localPort(of: taken)
        #expect(throws: Errno.addressInUse) { try IOLoop.listen(host: "127.0.0.1", port: port) }
        // SO_REUSEPORT on both: the port is shared.
        let a = try IOLoop.listen(host: "127.0.0.1", port: 0, reusePort: true)
        defer { try? a.close() }
        let b = try IOLoop.listen(host: "127.0.0.1", port: try IOLoop.localPort(of: a), reusePort: true)
        try b.close()
        #expect(throws: Errno.addressNotAvailable) { try IOLoop.listen(host: "203.0.113.1", port: 0) }
        // Unix sockets.
        #expect(throws: Errno.fileNameTooLong) { try IOLoop.listen(unixPath: "/tmp/" + String(repeating: "x", count: 103)) }
        #expect(throws: Errno.invalidArgument) { try IOLoop.listen(unixPath: "") }
        #expect(throws: Errno.noSuchFileOrDirectory) { try IOLoop.listen(unixPath: "/nonexistent-dir/x.sock") }
        let path = tempSocketPath()
        let unix = try IOLoop.listen(unixPath: path)
        defer {
            try? unix.close()
            unlink(path)
        }
        #expect(throws: Errno.addressInUse) { try IOLoop.listen(unixPath: path) }
        #expect(throws: Errno.addressFamilyNotSupported) { try IOLoop.localPort(of: unix) }
    }

    @Test func failedListensLeakNoDescriptor() async {
        printChild(await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try failedListensLeakNothingChild()
        })
    }

    @Test(arguments: testBackends)
    func aUnixListener(backend: ExactReader.Backend) async throws {
        let path = tempSocketPath()
        let listener = try IOLoop.listen(unixPath: path, backlog: 8)
        defer {
            try? listener.close()
            unlink(path)
        }
        #expect(fcntl(listener.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        try await IOLoop.withLoop(options: .init(backend: backend)) { loop in
            let client = try connectUnix(path)
            defer { try? client.close() }
            try send(client, frame(pattern(1000)))
            #expect(try await acceptOneFrame(loop, listener) == ByteView(pattern(1000)))
        }
    }

    /// One listener per loop on one port: every connection is accepted by one of them.
    @Test func aGroupListensOnOnePortOncePerLoop() async throws {
        try await IOLoopGroup.withLoopGroup(count: 3) { group in
            let listeners = try group.listen(host: "127.0.0.1", port: 0, backlog: 64)
            defer { for l in listeners { try? l.close() } }
            #expect(listeners.count == 3)
            #expect(Set(listeners.map(\.rawValue)).count == 3)
            let port = try IOLoop.localPort(of: listeners[0])
            #expect(try listeners.map { try IOLoop.localPort(of: $0) } == [port, port, port])
            let clients = try (0..<30).map { _ in try connectTo(loopback(port)) }
            defer { for c in clients { try? c.close() } }
            let accepted = Locked(0)
            await withTaskGroup(of: Void.self) { tasks in
                for (loop, listener) in zip(group.loops, listeners) {
                    tasks.addTask {
                        do {
                            for try await conn in loop.connections(accepting: listener) {
                                try? conn.close()
                                if accepted.withLock({ $0 += 1; return $0 }) == 30 { break }
                            }
                        } catch {}
                    }
                }
                let deadline = ContinuousClock.now + .seconds(60)
                while accepted.withLock({ $0 }) < 30 && ContinuousClock.now < deadline {
                    try? await Task.sleep(for: .milliseconds(10))
                }
                tasks.cancelAll()
            }
            #expect(accepted.withLock { $0 } == 30)
        }
    }
}

@Suite struct ScopeTests {
    struct Failure: Error {}

    @Test func withLoopReturnsTheBodysValueAndShutsDown() async throws {
        let kept = Locked<IOLoop?>(nil)
        let (a, b) = try socketPair(AF_UNIX)
        defer {
            try? a.close()
            try? b.close()
        }
        try send(b, frame([7, 7]))
        let frameCount = try await IOLoop.withLoop(options: .init(backend: .posix)) { loop in
            kept.withLock { $0 = loop }
            let reader = try AsyncExactReader(a, loop: loop)
            return try await reader.readFrame()?.count ?? -1
        }
        #expect(frameCount == 2)
        let loop = try #require(kept.withLock { $0 })
        #expect(loop.isStopped)
        #expect(throws: Errno.canceled) { try AsyncExactReader(a, loop: loop) }
    }

    @Test func withLoopShutsDownWhenTheBodyThrows() async throws {
        let kept = Locked<IOLoop?>(nil)
        await #expect(throws: Failure.self) {
            try await IOLoop.withLoop { loop in
                kept.withLock { $0 = loop }
                throw Failure()
            }
        }
        #expect(try #require(kept.withLock { $0 }).isStopped)
    }

    /// A cancelled task: the read in the scope ends, the loop shuts down.
    @Test func withLoopShutsDownWhenTheTaskIsCancelled() async throws {
        let kept = Locked<IOLoop?>(nil)
        let (a, b) = try socketPair(AF_UNIX)
        defer {
            try? a.close()
            try? b.close()
        }
        let task = Task {
            try await IOLoop.withLoop { loop in
                kept.withLock { $0 = loop }
                let reader = try AsyncExactReader(a, loop: loop)
                _ = try await reader.readFrame()  // nothing comes
            }
        }
        while kept.withLock({ $0 }) == nil { try await Task.sleep(for: .milliseconds(5)) }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(try #require(kept.withLock { $0 }).isStopped)
    }

    @Test func withLoopGroupShutsEveryLoopDown() async throws {
        let kept = Locked<[IOLoop]>([])
        let n = try await IOLoopGroup.withLoopGroup(count: 2, options: .init(backend: .posix)) { group in
            kept.withLock { $0 = group.loops }
            #expect(group.next() !== group.next())
            return group.loops.count
        }
        #expect(n == 2)
        #expect(kept.withLock { $0 }.allSatisfy { $0.isStopped })
        await #expect(throws: Failure.self) {
            try await IOLoopGroup.withLoopGroup(count: 2) { group in
                kept.withLock { $0 = group.loops }
                throw Failure()
            }
        }
        #expect(kept.withLock { $0 }.count == 2)
        #expect(kept.withLock { $0 }.allSatisfy { $0.isStopped })
    }

    /// Loops that cannot be made: the error, and the loops already made are shut down.
    @Test func withLoopGroupThrowsWhatTheLoopsThrow() async throws {
        await #expect(throws: ExactReader.InvalidOptionError.self) {
            try await IOLoopGroup.withLoopGroup(count: 2, options: .init(receiveBufferSize: 1)) { _ in }
        }
    }
}

/// The loop's logger: at `debug`, except the kernel interface failing for good (`error`).
@Suite struct LoopLoggingTests {
    typealias Capture = LoggingTests.Capture

    func logger(_ capture: Capture) -> Logger {
        Logger(label: "test") { _ in LoggingTests.Handler(capture: capture) }
    }

    @Test(arguments: testBackends)
    func startFallbackAndEndAreLoggedAtDebug(backend: ExactReader.Backend) async throws {
        let capture = Capture()
        let loop = try IOLoop(options: .init(backend: backend, logger: logger(capture)))
        await loop.shutdown()
        let entries = capture.entries
        #expect(entries.allSatisfy { $0.0 == .debug })
        let start = try #require(entries.first { $0.1 == "ExactIO loop started" })
        #expect(start.2["exactio.backend"] == "\(loop.backend)")
        #expect(start.2["exactio.fallback"] == "\(loop.fallbackReason ?? "none")")
        #expect(entries.contains { $0.1 == "ExactIO loop shut down" && $0.2["exactio.enters"] != nil })
    }

    /// io_uring demanded where it is denied (a seccomp filter, in a child process): the start
    /// fails, and says why at debug.
    @Test func aLoopThatCannotStartIsLogged() async {
        printChild(await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try loopStartFailureLogChild()
        })
    }

    /// A listener that fails for good: the sequence throws, and the loop says so at debug.
    @Test(arguments: testBackends)
    func aFailingListenerIsLogged(backend: ExactReader.Backend) async throws {
        let capture = Capture()
        try await IOLoop.withLoop(options: .init(backend: backend, logger: logger(capture))) { loop in
            // A socket that is not listening: accept fails with EINVAL.
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            let notListening = FileDescriptor(rawValue: fd)
            defer { try? notListening.close() }
            await #expect(throws: Errno.invalidArgument) {
                for try await _ in loop.connections(accepting: notListening) {}
            }
        }
        #expect(capture.entries.contains {
            $0.0 == .debug && $0.1 == "ExactIO listener failed" && $0.2["exactio.error"] == "\(Errno.invalidArgument)"
        })
    }

    /// The ring failing for good is the one event above debug.
    @Test(.enabled(if: uringAvailable))
    func aFailingRingIsLoggedAsAnError() async throws {
        let capture = Capture()
        let loop = try IOLoop(options: .init(backend: .ioUring, logger: logger(capture)))
        let (a, b) = try socketPair(AF_UNIX)
        defer {
            try? a.close()
            try? b.close()
        }
        let reader = try AsyncExactReader(a, loop: loop)
        loop.injectWaitFailures(count: 1_000_000, errno: EFAULT)
        await #expect(throws: Errno.badAddress) { _ = try await reader.readFrame() }
        await loop.shutdown()
        #expect(capture.entries.contains { $0.0 == .error && $0.1.contains("ExactIO loop failed") })
        #expect(capture.entries.filter { $0.0 != .debug }.count == 1)
    }

    @Test(arguments: testBackends)
    func acceptPausesAtTheDescriptorLimitAreLogged(backend: ExactReader.Backend) async {
        let uring = backend.isURing
        printChild(await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) { [uring = uring as Bool] in
            try await acceptPauseLogChild(ExactReader.Backend(uring: uring))
        })
    }
}

/// In an exit test: a loop that cannot start logs why.
func loopStartFailureLogChild() throws {
    if uringAvailable { childExpect(ctest_deny_io_uring() == 0, "seccomp filter not installed") }
    let capture = LoggingTests.Capture()
    do {
        _ = try IOLoop(options: .init(backend: .ioUring, logger: Logger(label: "test") { _ in LoggingTests.Handler(capture: capture) }))
        childExpect(false, "io_uring was used though denied")
    } catch {
        let entry = capture.entries.first { $0.1 == "ExactIO loop could not start" }
        childExpect(entry?.0 == .debug, "the failed start was not logged at debug: \(capture.entries)")
        childExpect(entry?.2["exactio.error"] == "\(error)", "the failed start's error: \(String(describing: entry?.2))")
    }
}

/// In an exit test: at RLIMIT_NOFILE, accepting pauses and the loop logs each pause.
func acceptPauseLogChild(_ backend: ExactReader.Backend) async throws {
    let capture = LoggingTests.Capture()
    let loop = try IOLoop(options: .init(backend: backend, logger: Logger(label: "test") { _ in LoggingTests.Handler(capture: capture) }))
    let listener = try IOLoop.listen(host: "127.0.0.1", port: 0)
    let port = try IOLoop.localPort(of: listener)
    var clients: [FileDescriptor] = []
    for _ in 0..<40 { clients.append(try connectTo(loopback(port))) }
    let accepted = Locked<[FileDescriptor]>([])
    // Room for the loop's duplicate of the listener and a few connections (as in
    // acceptAtTheLimitChild: the limit bounds descriptor numbers).
    let open = Set(((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int($0) })
    var bound = 0
    var freeBelow = 0
    while freeBelow < 8 {
        if !open.contains(bound) { freeBelow += 1 }
        bound += 1
    }
    var limit = rlimit(rlim_cur: rlim_t(bound), rlim_max: 20000)
    guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { exit(31) }
    let consumer = Task {
        for try await conn in loop.connections(accepting: listener) { accepted.withLock { $0.append(conn) } }
    }
    var waited = 0
    while !capture.entries.contains(where: { $0.1 == "ExactIO accepting paused" }) && waited < 500 {
        usleep(10_000)
        waited += 1
    }
    for fd in accepted.withLock({ $0 }) { try? fd.close() }
    limit.rlim_cur = 20000
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    let pause = capture.entries.first { $0.1 == "ExactIO accepting paused" }
    childExpect(pause != nil, "no pause was logged")
    childExpect(pause?.0 == .debug, "a pause was logged at \(String(describing: pause?.0))")
    childExpect(pause?.2["exactio.error"] == "\(Errno.tooManyOpenFiles)", "the pause's error: \(String(describing: pause?.2))")
    childExpect(pause?.2["exactio.pause_ms"] == "10", "the first pause: \(String(describing: pause?.2))")
    consumer.cancel()
    for c in clients { try? c.close() }
    await loop.shutdown()
}
