@_spi(Testing) import ExactIO
import ExactIOBenchCeiling
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

// Many connections at once (IOLoop and AsyncExactReader; README "Many connections"): the reader child listens,
// a writer process connects CONNECTIONS times and sends each connection FRAMES/CONNECTIONS
// frames (non-blocking writes, whichever connection can take bytes), the child accepts them all
// and then reads every frame with one strategy. Every strategy and peer reads the same accepted
// descriptors from the same writer, and counts and checks every frame.
//   c-uring-recv                the one-thread C ceiling (Benchmarks/ceiling/many.c): one
//                               IORING_OP_RECV of up to 256 KiB per connection into that
//                               connection's own buffer, re-armed per completion; one
//                               io_uring_submit_and_wait per turn reaps the batch of completions
//   c-epoll                     C, one thread: level-triggered epoll_wait, then one read(2) of up
//                               to 256 KiB per ready connection (its own buffer)
//   c-uring-mshot               C, one thread: a multishot receive per connection from a ring of
//                               provided 64 KiB buffers (2 per connection, 64 to 1024); frames
//                               parsed in place in each buffer, those that straddle buffers
//                               reassembled in the connection's carry buffer
//   loop-uring / loop-epoll     one IOLoop, an AsyncExactReader per connection, handlers as
//                               tasks on the global executor (a thread hop per completion)
//   loop-uring-exec / -epoll-exec  the same, handlers on the loop's thread
//                               (withTaskExecutorPreference: no hop, one thread for all)
//   group-uring                 an IOLoopGroup of 2 io_uring loops, connections spread
//                               round-robin (group.next()), handlers on their connection's loop
//   threads                     one blocking ExactReader and one thread per connection
//   (--peers) the connections handed to a peer process as descriptors 3, 4, …:
//   swift-nio-1 / swift-nio-2   SwiftNIO's LengthFieldBasedFrameDecoder on 1 / 2 event loops
//   tokio-1 / tokio-2           tokio + tokio_util LengthDelimitedCodec: current_thread runtime /
//                               multi-thread runtime with 2 workers (Benchmarks/peers/tokio)
//   py-asyncio / py-uvloop      CPython asyncio readexactly on asyncio's / uvloop's event loop
// The C rows are the ceiling: the table's ×ceiling column is each row's GB/s over the best of
// the three in the same run (same transport, frame size and connections), and its CPU/GiB
// column the reader's user+sys seconds per GiB read, to set against the ceiling's.
// The clock starts when the first connection is readable (peers: when they start reading).

/// The one-thread C ceilings (Benchmarks/ceiling/many.c).
let manyCeilingStrategies = ["c-uring-recv", "c-epoll", "c-uring-mshot"]
let manyStrategies = manyCeilingStrategies
    + ["loop-uring", "loop-epoll", "loop-uring-exec", "loop-epoll-exec", "group-uring", "threads"]
/// Peers (--peers), named with their thread count where they have one.
let manyPeerStrategies = ["swift-nio-1", "swift-nio-2", "tokio-1", "tokio-2", "py-asyncio", "py-uvloop"]
/// Strategies that need io_uring: left out where a ring cannot be created.
let manyURingOnlyStrategies = ["c-uring-recv", "c-uring-mshot"]
let manyConnectionCounts = [1, 16, 256, 1024]
let manySizes = [64, 4 << 10, 1 << 20]
/// Loops in `group-uring`.
let groupLoops = 2

/// The threads a many-connection strategy reads with, as the table shows them; rows are
/// compared with peers of the same count (`manyThreadClass`).
func manyThreadsLabel(_ s: String, connections: Int) -> String {
    switch s {
    case "loop-uring", "loop-epoll": "1+pool"
    case "group-uring": String(groupLoops)
    case "threads": String(connections)
    case "swift-nio-2", "tokio-2": "2"
    default: "1"
    }
}

/// 1 for the one-loop rows (handlers on the loop or on the pool), 2 for the two-thread rows
/// (`group-uring`, `threads` on this two-core machine, the two-thread peers): ×NIO and ×tokio
/// compare a row with `swift-nio-N` and `tokio-N` of its class.
func manyThreadClass(_ s: String) -> Int {
    ["group-uring", "threads", "swift-nio-2", "tokio-2"].contains(s) ? 2 : 1
}
/// The idle-memory case: this many connections, each with a read pending.
let idleConnections = 10_000

/// Bytes of bodies per many-connection case: about a second of work.
func manyBodyBytes(frameBytes n: Int, connections: Int, quick: Bool) -> Int {
    switch n {
    case ..<1024: quick ? 64 << 20 : 192 << 20
    case ..<(64 << 10): quick ? 512 << 20 : 2 << 30
    default: quick ? 1 << 30 : 2 << 30
    }
}

func makeManyCases(quick: Bool, peers: Bool, filter: [String]) -> [BenchCase] {
    var cases: [BenchCase] = []
    func add(_ s: String, _ t: String, _ n: Int, _ conns: Int) {
        let perConn = max(1, manyBodyBytes(frameBytes: n, connections: conns, quick: quick) / n / conns)
        let c = BenchCase(strategy: s, transport: t, frameBytes: n, frames: perConn * conns, connections: conns, many: true)
        if filter.isEmpty || filter.allSatisfy({ c.name.contains($0) }) { cases.append(c) }
    }
    let uring = exio_ceiling_uring_available() != 0
    let strategies = manyStrategies.filter { uring || !manyURingOnlyStrategies.contains($0) }
        + (peers ? manyPeerStrategies : [])
    if quick {
        for s in strategies { add(s, "tcp", 4 << 10, 256) }
        return cases
    }
    for t in ["unix", "tcp"] {
        for n in manySizes {
            for conns in manyConnectionCounts {
                for s in strategies {
                    // A thread per connection at 1 MiB × 1024 would pin 1 GiB of frames; skip.
                    if s == "threads" && conns > 256 && n >= 1 << 20 { continue }
                    add(s, t, n, conns)
                }
            }
        }
    }
    for s in ["loop-uring", "loop-epoll", "threads"] {
        let c = BenchCase(strategy: s, transport: "unix", frameBytes: 64, frames: idleConnections, connections: idleConnections, idle: true, many: true)
        if filter.isEmpty || filter.allSatisfy({ c.name.contains($0) }) { cases.append(c) }
    }
    return cases
}

// MARK: - The writer

/// Connects `connections` times to the child's listener and writes each connection
/// `frames / connections` frames of `n` bytes, with non-blocking writes to whichever connection
/// can take bytes. Idle cases: one frame each, after the child says so (a byte on stdin).
func runManyWriter(transport: String, n: Int, connections: Int, frames: Int, idle: Bool, port: UInt16?, path: String?) throws {
    signal(SIGPIPE, SIG_IGN)
    var fds: [Int32] = []
    for _ in 0..<connections {
        let fd: Int32
        if transport == "tcp" {
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = loopbackAddress(port: port ?? 0)
            guard withSockaddr(&addr, { connect(fd, $0, $1) }) == 0 else { throw BenchFailure("connect: errno \(errno)") }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        } else {
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            let p = Array((path ?? "").utf8CString)
            withUnsafeMutableBytes(of: &addr.sun_path) { dst in
                for (i, c) in p.enumerated() where i < dst.count { dst[i] = UInt8(bitPattern: c) }
            }
            let ok = withUnsafePointer(to: &addr) { ptr in
                ptr.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard ok == 0 else { throw BenchFailure("connect \(path ?? ""): errno \(errno)") }
        }
        fds.append(fd)
    }
    if idle {
        // Wait for the child's go (it measured its memory with every read pending).
        var go: UInt8 = 0
        _ = read(0, &go, 1)
        for fd in fds {
            let f = Marks.frame(n)
            try f.withUnsafeBytes { try writeAll(fd, $0.baseAddress!, $0.count) }
            close(fd)
        }
        return
    }
    // One page-aligned block of whole frames; each connection's stream position maps into it.
    let one = Marks.frame(n)
    let perBlock = max(1, (4 << 20) / one.count)
    let blockBytes = perBlock * one.count
    let block = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
    defer { block.deallocate() }
    for k in 0..<perBlock {
        one.withUnsafeBytes { (block.baseAddress! + k * one.count).copyMemory(from: $0.baseAddress!, byteCount: one.count) }
    }
    let total = frames / connections * one.count
    var sent = Array(repeating: 0, count: connections)
    for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    var pfds = fds.map { pollfd(fd: $0, events: Int16(POLLOUT), revents: 0) }
    var open = connections
    let chunk = max(one.count, min(256 << 10, blockBytes))
    while open > 0 {
        _ = poll(&pfds, nfds_t(pfds.count), -1)
        for i in 0..<connections where pfds[i].revents != 0 && sent[i] < total {
            while sent[i] < total {
                let at = sent[i] % blockBytes
                let want = min(total - sent[i], chunk, blockBytes - at)
                let w = write(fds[i], block.baseAddress! + at, want)
                // The reader gone (a strategy failed and closed its connections): stop, do not spin.
                if w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR {
                    throw BenchFailure("write: errno \(errno)")
                }
                if w <= 0 { break }
                sent[i] += w
            }
            if sent[i] == total {
                close(fds[i])
                pfds[i].fd = -1
                open -= 1
            }
        }
    }
}

// MARK: - The reader child

/// A listener for `transport`, the writer's arguments to reach it, and (unix) the path to remove.
func manyListener(_ transport: String) throws -> (fd: Int32, args: [String], path: String?) {
    if transport == "tcp" {
        let l = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = loopbackAddress(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withSockaddr(&addr) { sa, l2 in bind(l, sa, l2) == 0 && listen(l, 4096) == 0 && getsockname(l, sa, &len) == 0 }
        guard ok else { throw BenchFailure("tcp listen: errno \(errno)") }
        return (l, ["--port", String(UInt16(bigEndian: addr.sin_port))], nil)
    }
    let path = "/tmp/exactio-many-\(getpid()).sock"
    unlink(path)
    let l = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { dst in
        for (i, c) in Array(path.utf8).enumerated() where i < dst.count - 1 { dst[i] = c }
    }
    let ok = withUnsafePointer(to: &addr) { ptr in
        ptr.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            bind(l, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 && listen(l, 4096) == 0
        }
    }
    guard ok else { throw BenchFailure("unix listen: errno \(errno)") }
    return (l, ["--path", path], path)
}

/// Counters a strategy reports for syscalls per frame.
struct ManyOutcome {
    var frames = 0
    var syscalls = 0
    var note = ""
}

func runManyCase(_ c: BenchCase) throws -> CaseResult {
    var nofile = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &nofile)
    nofile.rlim_cur = nofile.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &nofile)
    let listener = try manyListener(c.transport)
    defer {
        close(listener.fd)
        if let p = listener.path { unlink(p) }
    }
    var goPipe: [Int32] = [0, 0]
    pipe(&goPipe)
    var writerArgs = ["--many-writer", c.transport, String(c.frameBytes), String(c.connections), String(c.frames)]
    if c.idle { writerArgs.append("--idle") }
    let writer = try spawn(selfPath, writerArgs + listener.args, stdinFD: goPipe[0])
    close(goPipe[0])
    defer { waitExit(writer) }
    var conns: [Int32] = []
    while conns.count < c.connections {
        let fd = accept(listener.fd, nil, nil)
        if fd < 0 {
            if errno == EINTR { continue }
            throw BenchFailure("accept: errno \(errno)")
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        conns.append(fd)
    }
    defer { for fd in conns { close(fd) } }
    if manyPeerStrategies.contains(c.strategy) { return try runManyPeer(c, conns) }
    if c.idle { return try runIdleCase(c, conns, go: goPipe[1]) }
    close(goPipe[1])

    // The clock starts when the first connection is readable.
    var pfd = pollfd(fd: conns[0], events: Int16(POLLIN), revents: 0)
    _ = poll(&pfd, 1, -1)
    resetPeak()
    let baseline = procStatusBytes("VmRSS")
    let cpu0 = cpuTimes()
    let t0 = now()
    let outcome: ManyOutcome
    switch c.strategy {
    case _ where manyCeilingStrategies.contains(c.strategy):
        outcome = try runCeilingStrategy(c, conns)
    case "loop-uring", "loop-epoll", "loop-uring-exec", "loop-epoll-exec":
        outcome = try runLoopStrategy(c, conns)
    case "group-uring":
        outcome = try runGroupStrategy(c, conns)
    case "threads":
        outcome = try runThreadsStrategy(c, conns)
    default:
        throw BenchFailure("unknown strategy \(c.strategy)")
    }
    let seconds = now() - t0
    let cpu1 = cpuTimes()
    let peak = procStatusBytes("VmHWM")
    guard outcome.frames == c.frames else { throw BenchFailure("read \(outcome.frames) frames, expected \(c.frames)") }
    var r = CaseResult(
        strategy: c.strategy, transport: c.transport, frameBytes: c.frameBytes, frames: c.frames,
        seconds: seconds, gbPerSecond: Double(c.frames) * Double(c.frameBytes) / seconds / 1e9,
        framesPerSecond: Double(c.frames) / seconds, peakRSSBytes: peak, baselineRSSBytes: baseline,
        peakOverFrame: Double(peak - baseline) / Double(c.frameBytes),
        cpuUserSeconds: cpu1.user - cpu0.user, cpuSystemSeconds: cpu1.sys - cpu0.sys, note: outcome.note)
    r.connections = c.connections
    r.many = true
    r.rssPerConnection = Double(peak - baseline) / Double(c.connections)
    r.syscallsPerFrame = Double(outcome.syscalls) / Double(c.frames)
    return r
}

/// c-uring-recv, c-epoll, c-uring-mshot: Benchmarks/ceiling/many.c on this thread.
func runCeilingStrategy(_ c: BenchCase, _ conns: [Int32]) throws -> ManyOutcome {
    let mode: Int32 = switch c.strategy {
    case "c-uring-recv": Int32(EXIO_MANY_URING_RECV)
    case "c-epoll": Int32(EXIO_MANY_EPOLL)
    default: Int32(EXIO_MANY_URING_MSHOT)
    }
    var st = exio_many_stats()
    let got = conns.withUnsafeBufferPointer {
        exio_many_run($0.baseAddress, Int32($0.count), UInt64(c.frameBytes), Int64(c.frames / c.connections), mode, &st)
    }
    guard got >= 0 else { throw BenchFailure("\(c.strategy): \(String(cString: strerror(Int32(-got))))") }
    let bytes = Double(c.frames) * Double(c.frameBytes + 4)
    var note = String(
        format: "one thread: %lld receives (%.0f KiB each), %lld completions, %.2f %% of bytes copied",
        st.receives, bytes / Double(max(1, st.receives)) / 1024, st.completions, Double(st.bytes_copied) / bytes * 100)
    if mode != Int32(EXIO_MANY_EPOLL) {
        let taskrun = st.taskrun == 2 ? "DEFER_TASKRUN" : st.taskrun == 1 ? "COOP_TASKRUN" : "default task-run"
        note += ", ring \(taskrun)"
    }
    if mode == Int32(EXIO_MANY_URING_MSHOT) {
        note += ", \(st.provided_buffers) provided 64 KiB buffers, ENOBUFS \(st.starvations), re-armed \(st.rearms)"
    }
    return ManyOutcome(frames: Int(got), syscalls: Int(st.syscalls), note: note)
}

/// Runs `body` on the Swift concurrency pool and waits for it (the bench's main is synchronous).
func blockingAwait<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    let result = Mutex<Result<T, any Error>?>(nil)
    Task {
        do {
            let v = try await body()
            result.withLock { $0 = .success(v) }
        } catch {
            result.withLock { $0 = .failure(error) }
        }
        done.signal()
    }
    done.wait()
    return try result.withLock { $0! }.get()
}

func runLoopStrategy(_ c: BenchCase, _ conns: [Int32]) throws -> ManyOutcome {
    let backend: ExactReader.Backend = c.strategy.hasPrefix("loop-uring") ? .ioUring : .posix
    let onLoop = c.strategy.hasSuffix("-exec")
    let loop = try IOLoop(options: .init(backend: backend))
    if ProcessInfo.processInfo.environment["EXACTIO_BENCH_DUMP"] != nil {
        Thread.detachNewThread {
            sleep(15)
            FileHandle.standardError.write(loop.debugState().data(using: .utf8)!)
        }
    }
    let perConn = c.frames / c.connections
    let n = c.frameBytes
    let fds = conns
    let frames = try blockingAwait { () async throws -> Int in
        try await withThrowingTaskGroup(of: Int.self) { group in
            for fd in fds {
                if onLoop {
                    group.addTask(executorPreference: loop) { try await readConnection(fd, loop, frames: perConn, n) }
                } else {
                    group.addTask { try await readConnection(fd, loop, frames: perConn, n) }
                }
            }
            return try await group.reduce(0, +)
        }
    }
    let s = loop.statistics
    try blockingAwait { await loop.shutdown() }
    // io_uring: each enter is a syscall; the eventfd read after a wakeup is one more. epoll:
    // epoll_wait, every read(2), and the wakeup reads.
    let syscalls = backend == .ioUring ? s.enters + s.wakeups : s.enters + s.reads + s.wakeups
    return ManyOutcome(
        frames: frames, syscalls: syscalls,
        note: "\(loop.backend): enters \(s.enters), reads \(s.reads), completions \(s.completions), wakeups \(s.wakeups), starvations \(s.starvations)")
}

/// One connection's frames through an AsyncExactReader on `loop`: the frames read.
@Sendable
/// One connection's handler on the loop: every frame checked in place, lent by `forEachFrame`
/// (the call for a handler that keeps no frame, as the C strategies parse in place), or
/// returned as a view by `readFrame` with EXACTIO_BENCH_LOOP_VIEWS=1.
func readConnection(_ fd: Int32, _ loop: IOLoop, frames perConn: Int, _ n: Int) async throws -> Int {
    let reader = try AsyncExactReader(FileDescriptor(rawValue: fd), loop: loop, options: .init(maxFrameLength: 1 << 30))
    var got = 0
    if loopReadsViews {
        while got < perConn, let f = try await reader.readFrame() {
            try f.withUnsafeBytes { try checkFrame($0, n) }
            got += 1
        }
        return got
    }
    guard perConn > 0 else { return 0 }
    try await reader.forEachFrame { (frame: RawSpan) throws -> Bool in
        try frame.withUnsafeBytes { try checkFrame($0, n) }
        got += 1
        return got < perConn
    }
    return got
}

let loopReadsViews = ProcessInfo.processInfo.environment["EXACTIO_BENCH_LOOP_VIEWS"] == "1"

/// group-uring: an IOLoopGroup of `groupLoops` io_uring loops; each connection's reader on
/// `group.next()` and its handler on that loop's thread.
func runGroupStrategy(_ c: BenchCase, _ conns: [Int32]) throws -> ManyOutcome {
    let loops = try IOLoopGroup(count: groupLoops, options: .init(backend: .ioUring))
    let perConn = c.frames / c.connections
    let n = c.frameBytes
    let fds = conns
    let frames = try blockingAwait { () async throws -> Int in
        try await withThrowingTaskGroup(of: Int.self) { group in
            for fd in fds {
                let loop = loops.next()
                group.addTask(executorPreference: loop) { try await readConnection(fd, loop, frames: perConn, n) }
            }
            return try await group.reduce(0, +)
        }
    }
    let stats = loops.loops.map(\.statistics)
    let backends = Set(loops.loops.map { "\($0.backend)" }).sorted().joined(separator: "/")
    try blockingAwait { await loops.shutdown() }
    let enters = stats.reduce(0) { $0 + $1.enters }, wakeups = stats.reduce(0) { $0 + $1.wakeups }
    let reads = stats.reduce(0) { $0 + $1.reads }, completions = stats.reduce(0) { $0 + $1.completions }
    let starvations = stats.reduce(0) { $0 + $1.starvations }
    return ManyOutcome(
        frames: frames, syscalls: enters + wakeups,
        note: "\(groupLoops) loops, \(backends): enters \(enters), reads \(reads), completions \(completions), wakeups \(wakeups), starvations \(starvations)")
}

func runThreadsStrategy(_ c: BenchCase, _ conns: [Int32]) throws -> ManyOutcome {
    let perConn = c.frames / c.connections
    let n = c.frameBytes
    let total = Atomic<Int>(0)
    let syscalls = Atomic<Int>(0)
    let failed = Atomic<Bool>(false)
    var threads: [pthread_t] = []
    final class Job: @unchecked Sendable {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }
    for fd in conns {
        let job = Job {
            do {
                let reader = try ExactReader(FileDescriptor(rawValue: fd), options: .init(maxFrameLength: 1 << 30))
                var got = 0
                while got < perConn, let f = try reader.readFrame() {
                    try f.withUnsafeBytes { try checkFrame($0, n) }
                    got += 1
                }
                total.add(got, ordering: .relaxed)
                syscalls.add(reader.statistics.reads + reader.statistics.polls, ordering: .relaxed)
            } catch {
                failed.store(true, ordering: .relaxed)
            }
        }
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, 256 << 10)
        var tid = pthread_t()
        let ret = pthread_create(&tid, &attr, { arg in
            Unmanaged<Job>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, Unmanaged.passRetained(job).toOpaque())
        pthread_attr_destroy(&attr)
        guard ret == 0 else { throw BenchFailure("pthread_create: \(ret)") }
        threads.append(tid)
    }
    for t in threads { pthread_join(t, nil) }
    if failed.load(ordering: .relaxed) { throw BenchFailure("a reader thread failed") }
    return ManyOutcome(frames: total.load(ordering: .relaxed), syscalls: syscalls.load(ordering: .relaxed), note: "\(c.connections) threads")
}

/// 10,000 connections, each with a read pending: RSS per connection, then one frame each.
func runIdleCase(_ c: BenchCase, _ conns: [Int32], go: Int32) throws -> CaseResult {
    let t0 = now()
    resetPeak()
    let baseline = procStatusBytes("VmRSS")
    var measured = 0
    var frames = 0
    switch c.strategy {
    case "threads":
        final class Box: @unchecked Sendable { var readers: [ExactReader] = [] }
        let box = Box()
        for fd in conns { box.readers.append(try ExactReader(FileDescriptor(rawValue: fd))) }
        measured = procStatusBytes("VmRSS")
        var one: UInt8 = 1
        _ = write(go, &one, 1)
        close(go)
        for r in box.readers where (try? r.readFrame()) != nil { frames += 1 }
    default:
        let loop = try IOLoop(options: .init(backend: c.strategy == "loop-uring" ? .ioUring : .posix))
        let fds = conns
        final class Counters: Sendable {
            let counted = Atomic<Int>(0)
            let ready = Atomic<Int>(0)
        }
        let counters = Counters()
        let task = Task {
            await withTaskGroup(of: Void.self) { group in
                for fd in fds {
                    group.addTask(executorPreference: loop) {
                        guard let reader = try? AsyncExactReader(FileDescriptor(rawValue: fd), loop: loop) else { return }
                        counters.ready.add(1, ordering: .relaxed)
                        if (try? await reader.readFrame()) != nil { counters.counted.add(1, ordering: .relaxed) }
                    }
                }
            }
        }
        while counters.ready.load(ordering: .relaxed) < fds.count { usleep(1000) }
        usleep(200_000)  // every read armed
        measured = procStatusBytes("VmRSS")
        var one: UInt8 = 1
        _ = write(go, &one, 1)
        close(go)
        try blockingAwait { await task.value }
        frames = counters.counted.load(ordering: .relaxed)
        try blockingAwait { await loop.shutdown() }
    }
    let seconds = now() - t0
    guard frames == c.connections else { throw BenchFailure("idle: \(frames) frames of \(c.connections)") }
    var r = CaseResult(
        strategy: c.strategy, transport: c.transport, frameBytes: c.frameBytes, frames: frames, seconds: seconds,
        gbPerSecond: 0, framesPerSecond: Double(frames) / seconds, peakRSSBytes: measured, baselineRSSBytes: baseline,
        peakOverFrame: 0, cpuUserSeconds: 0, cpuSystemSeconds: 0,
        note: "RSS with \(c.connections) reads pending, kernel socket buffers aside")
    r.connections = c.connections
    r.many = true
    r.rssPerConnection = Double(measured - baseline) / Double(c.connections)
    r.idle = true
    return r
}

/// Hands the accepted connections to a peer process (as descriptors 3, 4, …).
func runManyPeer(_ c: BenchCase, _ conns: [Int32]) throws -> CaseResult {
    let (program, prefix) = try peerProgram(c.strategy)
    let args = prefix + [c.strategy, c.transport, String(c.frameBytes), String(c.frames), String(c.connections)]
    var p: [Int32] = [0, 0]
    guard pipe(&p) == 0 else { throw BenchFailure("pipe: errno \(errno)") }
    let pid = try spawn(program, args, passFDs: conns, stdoutFD: p[1])
    close(p[1])
    let out = readToEnd(closing: p[0])
    let status = waitExit(pid)
    guard status == 0 else { throw BenchFailure("\(c.strategy) exited with \(status)") }
    var r = try JSONDecoder().decode(CaseResult.self, from: Data(out))
    guard r.frames == c.frames else { throw BenchFailure("\(c.strategy) read \(r.frames) frames, expected \(c.frames)") }
    r.connections = c.connections
    r.many = true
    r.rssPerConnection = Double(r.peakRSSBytes - r.baselineRSSBytes) / Double(c.connections)
    return r
}
