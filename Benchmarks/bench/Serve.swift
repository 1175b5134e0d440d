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

// Serving (issue 19): answering and relaying what arrives, with AsyncExactWriter.
//
// reply: 256 TCP connections × 4 KiB frames; a client process (Benchmarks/ceiling/serve.c,
//   exio_reply_client) keeps at most `replyWindow` frames unacknowledged per connection, and the
//   child answers each frame with an 8-byte ack (the frame's number) before reading the next.
//   reply-c                                    the C ceiling (serve.c, exio_reply_server): one
//                                              thread, epoll, one read(2) per ready connection,
//                                              frames checked in place, the acks of a read sent
//                                              in one write(2)
//   reply-loop-uring / reply-loop-epoll        one IOLoop, withConnection per connection,
//                                              handlers on the global pool (a hop per completion)
//   reply-loop-uring-exec / reply-loop-epoll-exec  the same, handlers on the loop's thread
//   reply-threads                              a blocking ExactReader and write(2) per thread
//   (--peers) reply-swift-nio-1 / -2           SwiftNIO (Benchmarks/peers/nio): the connections
//                                              handed over as descriptors 3, 4, …;
//                                              LengthFieldBasedFrameDecoder, an 8-byte ack written
//                                              per frame, flushed per read; 1 / 2 event loops
// relay: 64 TCP connections × 1 MiB frames, each frame sent on to a sink connection of its own
//   (a sink process reads and discards); the CPU is the child's (reader and sender), per GiB.
//   relay-c                                    the C ceiling, read-then-write: one thread, epoll,
//                                              read(2) 256 KiB then send(2) it (serve.c)
//   relay-loop-uring / relay-loop-epoll        one IOLoop, handlers on its thread: readFrame,
//                                              then writeFrame of the same view (no user-space
//                                              copy), automatic zero-copy (off on loopback)
//   relay-loop-uring-zc                        the same with SEND_ZC forced (zeroCopyThreshold
//                                              64 KiB): the measurement behind "off on loopback"
//   relay-threads                              a blocking ExactReader and writev(2) per thread
// The relay's `copied` column is the readers' `statistics.bytesCopied` (0 for the loop: the
// frame goes out from the memory it landed in); the writers' copies (the 4-byte prefixes that
// writeFrame stages) are in the note.

let replyStrategies = ["reply-c", "reply-loop-uring", "reply-loop-epoll", "reply-loop-uring-exec", "reply-loop-epoll-exec", "reply-threads"]
/// SwiftNIO answering the reply case (--peers), with 1 and 2 event loops.
let replyPeerStrategies = ["reply-swift-nio-1", "reply-swift-nio-2"]
let relayStrategies = ["relay-c", "relay-loop-uring", "relay-loop-uring-zc", "relay-loop-epoll", "relay-threads"]
let serveStrategies = replyStrategies + replyPeerStrategies + relayStrategies
let serveURingOnlyStrategies = ["reply-loop-uring", "reply-loop-uring-exec", "relay-loop-uring", "relay-loop-uring-zc"]
/// Frames the reply client keeps unacknowledged per connection.
let replyWindow = 8

func makeServeCases(quick: Bool, peers: Bool, filter: [String]) -> [BenchCase] {
    let uring = exio_ceiling_uring_available() != 0
    var cases: [BenchCase] = []
    for s in serveStrategies where (uring || !serveURingOnlyStrategies.contains(s)) && (peers || !replyPeerStrategies.contains(s)) {
        let reply = !relayStrategies.contains(s)
        let (n, conns, bodies) = reply ? (4 << 10, 256, quick ? 256 << 20 : 1 << 30) : (1 << 20, 64, quick ? 1 << 30 : 2 << 30)
        let c = BenchCase(strategy: s, transport: "tcp", frameBytes: n, frames: bodies / n / conns * conns, connections: conns, many: true)
        if filter.isEmpty || filter.allSatisfy({ c.name.contains($0) }) { cases.append(c) }
    }
    return cases
}

/// Threads a serving strategy runs on, as the table shows them.
func serveThreadsLabel(_ s: String, connections: Int) -> String {
    if s.hasSuffix("-threads") { return String(connections) }
    if s == "reply-loop-uring" || s == "reply-loop-epoll" { return "1+pool" }
    if s == "reply-swift-nio-2" { return "2" }
    return "1"
}

// MARK: - The child

func runServeCase(_ c: BenchCase) throws -> CaseResult {
    signal(SIGPIPE, SIG_IGN)
    var nofile = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &nofile)
    nofile.rlim_cur = nofile.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &nofile)
    let reply = !relayStrategies.contains(c.strategy)
    let perConn = c.frames / c.connections
    let listener = try manyListener(c.transport)
    defer { close(listener.fd) }
    // The peers: the reply client, or the frame writer and the sink.
    var peers: [pid_t] = []
    var sinkListener: (fd: Int32, args: [String], path: String?)? = nil
    if reply {
        peers.append(try spawn(selfPath, ["--reply-client", c.transport, String(c.frameBytes), String(c.connections), String(c.frames)] + listener.args))
    } else {
        let sink = try manyListener(c.transport)
        sinkListener = sink
        peers.append(try spawn(selfPath, ["--many-writer", c.transport, String(c.frameBytes), String(c.connections), String(c.frames)] + listener.args))
        let expected = c.frames * (c.frameBytes + 4)
        peers.append(try spawn(selfPath, ["--sink", c.transport, String(c.connections), String(expected)] + sink.args))
    }
    defer { if let s = sinkListener { close(s.fd) } }
    func acceptAll(_ l: Int32) throws -> [Int32] {
        var fds: [Int32] = []
        while fds.count < c.connections {
            let fd = accept(l, nil, nil)
            if fd < 0 {
                if errno == EINTR { continue }
                throw BenchFailure("accept: errno \(errno)")
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            fds.append(fd)
        }
        return fds
    }
    let conns = try acceptAll(listener.fd)
    let sinks = try sinkListener.map { try acceptAll($0.fd) } ?? []
    if replyPeerStrategies.contains(c.strategy) {
        defer { for fd in conns { close(fd) } }
        return try runReplyPeer(c, conns, client: peers[0])
    }
    // Descriptors a strategy did not hand to withConnection (which closes its own) close here.
    var closed = false
    defer {
        if !closed { for fd in conns { close(fd) } }
        for fd in sinks { close(fd) }
    }

    var pfd = pollfd(fd: conns[0], events: Int16(POLLIN), revents: 0)
    _ = poll(&pfd, 1, -1)
    resetPeak()
    let baseline = procStatusBytes("VmRSS")
    let cpu0 = cpuTimes()
    let t0 = now()
    var outcome: ServeOutcome
    switch c.strategy {
    case "reply-c":
        var st = exio_reply_stats()
        let answered = conns.withUnsafeBufferPointer {
            exio_reply_server($0.baseAddress, Int32(c.connections), UInt64(c.frameBytes), Int64(perConn), &st)
        }
        guard answered >= 0 else { throw BenchFailure("reply-c: \(String(cString: strerror(Int32(-answered))))") }
        outcome = ServeOutcome(
            frames: Int(answered), syscalls: Int(st.waits + st.reads + st.writes),
            note: "one thread: \(st.waits) epoll_wait, \(st.reads) reads, \(st.writes) ack writes")
    case "reply-loop-uring", "reply-loop-epoll", "reply-loop-uring-exec", "reply-loop-epoll-exec":
        closed = true
        outcome = try runReplyLoop(c, conns, perConn: perConn)
    case "reply-threads":
        outcome = try runReplyThreads(c, conns, perConn: perConn)
    case "relay-c":
        var st = exio_relay_stats()
        let moved = conns.withUnsafeBufferPointer { src in
            sinks.withUnsafeBufferPointer { dst in exio_relay_run(src.baseAddress, dst.baseAddress, Int32(c.connections), &st) }
        }
        guard moved >= 0 else { throw BenchFailure("relay-c: \(String(cString: strerror(Int32(-moved))))") }
        outcome = ServeOutcome(
            frames: Int(moved) / (c.frameBytes + 4), syscalls: Int(st.waits + st.syscalls),
            note: "one thread: \(st.syscalls) read/send calls, \(st.waits) epoll_wait; copies every byte through a 256 KiB buffer")
        outcome.bytesCopied = nil
    case "relay-loop-uring", "relay-loop-uring-zc", "relay-loop-epoll":
        outcome = try runRelayLoop(c, conns, sinks)
    case "relay-threads":
        outcome = try runRelayThreads(c, conns, sinks, perConn: perConn)
    default:
        throw BenchFailure("unknown strategy \(c.strategy)")
    }
    let seconds = now() - t0
    let cpu1 = cpuTimes()
    let peak = procStatusBytes("VmHWM")
    for pid in peers {
        let status = waitExit(pid)
        guard status == 0 else { throw BenchFailure("\(c.strategy): a peer process exited with \(status)") }
    }
    guard outcome.frames == c.frames else { throw BenchFailure("\(c.strategy): \(outcome.frames) frames, expected \(c.frames)") }
    var r = CaseResult(
        strategy: c.strategy, transport: c.transport, frameBytes: c.frameBytes, frames: c.frames,
        seconds: seconds, gbPerSecond: Double(c.frames) * Double(c.frameBytes) / seconds / 1e9,
        framesPerSecond: Double(c.frames) / seconds, peakRSSBytes: peak, baselineRSSBytes: baseline,
        peakOverFrame: Double(peak - baseline) / Double(c.frameBytes),
        cpuUserSeconds: cpu1.user - cpu0.user, cpuSystemSeconds: cpu1.sys - cpu0.sys, note: outcome.note)
    r.connections = c.connections
    r.many = true
    r.serve = reply ? "reply" : "relay"
    r.rssPerConnection = Double(peak - baseline) / Double(c.connections)
    r.syscallsPerFrame = outcome.syscalls.map { Double($0) / Double(c.frames) }
    r.bytesCopied = outcome.bytesCopied
    r.bytesSentZeroCopy = outcome.bytesSentZeroCopy
    return r
}

struct ServeOutcome {
    var frames = 0
    /// nil where the strategy does not count them (relay-threads).
    var syscalls: Int? = 0
    var note = ""
    /// The readers' user-space copies (`statistics.bytesCopied`; nil for the C rows).
    var bytesCopied: Int? = nil
    var bytesSentZeroCopy: Int? = nil
}

/// Counters of a loop strategy's readers and writers, summed across connections.
final class ServeCounters: Sendable {
    let frames = Atomic<Int>(0)
    let readerCopied = Atomic<Int>(0)
    let writerCopied = Atomic<Int>(0)
    let zeroCopy = Atomic<Int>(0)
    let refusals = Atomic<Int>(0)
    let readerReads = Atomic<Int>(0)
    let directReads = Atomic<Int>(0)

    func add(_ r: ExactReader.Statistics, _ w: AsyncExactWriter.Statistics, frames n: Int) {
        frames.add(n, ordering: .relaxed)
        readerCopied.add(r.bytesCopied, ordering: .relaxed)
        writerCopied.add(w.bytesCopied, ordering: .relaxed)
        zeroCopy.add(w.bytesSentZeroCopy, ordering: .relaxed)
        refusals.add(w.zeroCopyRefusals, ordering: .relaxed)
        readerReads.add(r.reads, ordering: .relaxed)
        directReads.add(r.directReads, ordering: .relaxed)
    }
}

func loopNote(_ loop: IOLoop, _ s: IOLoop.Statistics) -> String {
    "\(loop.backend): enters \(s.enters), reads \(s.reads), sends \(s.sends), completions \(s.completions), wakeups \(s.wakeups)"
}

func runReplyLoop(_ c: BenchCase, _ conns: [Int32], perConn: Int) throws -> ServeOutcome {
    let backend: ExactReader.Backend = c.strategy.hasPrefix("reply-loop-uring") ? .ioUring : .posix
    let onLoop = c.strategy.hasSuffix("-exec")
    let loop = try IOLoop(options: .init(backend: backend))
    let counters = ServeCounters()
    let n = c.frameBytes
    try blockingAwait { () async throws -> Void in
        try await withThrowingDiscardingTaskGroup { group in
            for fd in conns {
                let handler: @Sendable () async throws -> Void = {
                    try await replyConnection(fd, loop, frames: perConn, n, counters)
                }
                if onLoop {
                    group.addTask(executorPreference: loop, operation: handler)
                } else {
                    group.addTask(operation: handler)
                }
            }
        }
    }
    let s = loop.statistics
    try blockingAwait { await loop.shutdown() }
    let syscalls = backend == .ioUring ? s.enters + s.wakeups : s.enters + s.reads + s.sends + s.wakeups
    return ServeOutcome(
        frames: counters.frames.load(ordering: .relaxed), syscalls: syscalls,
        note: loopNote(loop, s) + "; writers copied \(fmtBytes(counters.writerCopied.load(ordering: .relaxed))) (the acks)",
        bytesCopied: counters.readerCopied.load(ordering: .relaxed))
}

/// One connection of the reply case: every frame read and checked, then acknowledged with its
/// number (8 bytes, little-endian) before the next is read.
@Sendable
func replyConnection(_ fd: Int32, _ loop: IOLoop, frames perConn: Int, _ n: Int, _ counters: ServeCounters) async throws {
    try await loop.withConnection(FileDescriptor(rawValue: fd), readerOptions: .init(maxFrameLength: 1 << 30)) { reader, writer in
        // The ack's memory: one buffer per connection, copied by write(copying:).
        let ack = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
        defer { ack.deallocate() }
        var k = 0
        while k < perConn, let f = try await reader.readFrame() {
            try f.withUnsafeBytes { try checkFrame($0, n) }
            k += 1
            ack.storeBytes(of: UInt64(k).littleEndian, as: UInt64.self)
            try await writer.write(copying: UnsafeRawBufferPointer(ack))
        }
        counters.add(reader.statistics, writer.statistics, frames: k)
    }
}

/// Runs `body` on a thread of its own per element, and waits for them all.
func onThreads(_ count: Int, stack: Int = 256 << 10, _ body: @escaping @Sendable (Int) throws -> Void) throws {
    final class Job: @unchecked Sendable {
        let run: () -> Void
        init(_ run: @escaping () -> Void) { self.run = run }
    }
    let failed = Atomic<Bool>(false)
    var threads: [pthread_t] = []
    for i in 0..<count {
        let job = Job {
            do { try body(i) } catch { failed.store(true, ordering: .relaxed) }
        }
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, stack)
        var tid = pthread_t()
        let ret = pthread_create(&tid, &attr, { arg in
            Unmanaged<Job>.fromOpaque(arg!).takeRetainedValue().run()
            return nil
        }, Unmanaged.passRetained(job).toOpaque())
        pthread_attr_destroy(&attr)
        guard ret == 0 else { throw BenchFailure("pthread_create: \(ret)") }
        threads.append(tid)
    }
    for t in threads { pthread_join(t, nil) }
    if failed.load(ordering: .relaxed) { throw BenchFailure("a thread failed") }
}

func runReplyThreads(_ c: BenchCase, _ conns: [Int32], perConn: Int) throws -> ServeOutcome {
    let n = c.frameBytes
    let frames = Atomic<Int>(0)
    let syscalls = Atomic<Int>(0)
    let copied = Atomic<Int>(0)
    try onThreads(conns.count) { i in
        let fd = conns[i]
        let reader = try ExactReader(FileDescriptor(rawValue: fd), options: .init(maxFrameLength: 1 << 30))
        var k = 0
        while k < perConn, let f = try reader.readFrame() {
            try f.withUnsafeBytes { try checkFrame($0, n) }
            k += 1
            var ack = UInt64(k).littleEndian
            try withUnsafeBytes(of: &ack) { try writeAll(fd, $0.baseAddress!, 8) }
        }
        frames.add(k, ordering: .relaxed)
        syscalls.add(reader.statistics.reads + reader.statistics.polls + k, ordering: .relaxed)
        copied.add(reader.statistics.bytesCopied, ordering: .relaxed)
    }
    return ServeOutcome(
        frames: frames.load(ordering: .relaxed), syscalls: syscalls.load(ordering: .relaxed),
        note: "\(conns.count) threads: ExactReader + write(2) per ack", bytesCopied: copied.load(ordering: .relaxed))
}

func runRelayLoop(_ c: BenchCase, _ conns: [Int32], _ sinks: [Int32]) throws -> ServeOutcome {
    let backend: ExactReader.Backend = c.strategy.hasPrefix("relay-loop-uring") ? .ioUring : .posix
    let zeroCopy = c.strategy.hasSuffix("-zc")
    let loop = try IOLoop(options: .init(backend: backend))
    let counters = ServeCounters()
    try blockingAwait { () async throws -> Void in
        try await withThrowingDiscardingTaskGroup { group in
            for (src, dst) in zip(conns, sinks) {
                group.addTask(executorPreference: loop) {
                    let reader = try AsyncExactReader(FileDescriptor(rawValue: src), loop: loop, options: .init(maxFrameLength: 1 << 30))
                    let writer = try AsyncExactWriter(
                        FileDescriptor(rawValue: dst), loop: loop, options: .init(zeroCopyThreshold: zeroCopy ? 64 << 10 : nil))
                    var k = 0
                    for try await f in reader.frames() {
                        try await writer.writeFrame(f)
                        k += 1
                    }
                    try await writer.finish()
                    counters.add(reader.statistics, writer.statistics, frames: k)
                }
            }
        }
    }
    let s = loop.statistics
    try blockingAwait { await loop.shutdown() }
    let copied = counters.readerCopied.load(ordering: .relaxed)
    let zc = counters.zeroCopy.load(ordering: .relaxed)
    let syscalls = backend == .ioUring ? s.enters + s.wakeups : s.enters + s.reads + s.sends + s.wakeups
    return ServeOutcome(
        frames: counters.frames.load(ordering: .relaxed), syscalls: syscalls,
        note: loopNote(loop, s) + "; readers: \(counters.readerReads.load(ordering: .relaxed)) reads, \(counters.directReads.load(ordering: .relaxed)) large reads, copied \(fmtBytes(counters.readerCopied.load(ordering: .relaxed))); writers copied \(fmtBytes(counters.writerCopied.load(ordering: .relaxed))); zero-copy \(fmtBytes(zc)), refusals \(counters.refusals.load(ordering: .relaxed))",
        bytesCopied: copied, bytesSentZeroCopy: zc)
}

func runRelayThreads(_ c: BenchCase, _ conns: [Int32], _ sinks: [Int32], perConn: Int) throws -> ServeOutcome {
    let frames = Atomic<Int>(0)
    let copied = Atomic<Int>(0)
    try onThreads(conns.count) { i in
        let reader = try ExactReader(FileDescriptor(rawValue: conns[i]), options: .init(maxFrameLength: 1 << 30))
        let dst = sinks[i]
        var k = 0
        while let f = try reader.readFrame() {
            let n = UInt32(f.count).bigEndian
            try withUnsafeBytes(of: n) { head in
                try f.withUnsafeBytes { body in
                    var iov = [iovec(iov_base: UnsafeMutableRawPointer(mutating: head.baseAddress!), iov_len: 4),
                               iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress!), iov_len: body.count)]
                    var left = 4 + body.count
                    while left > 0 {
                        let w = writev(dst, &iov, Int32(iov.count))
                        if w < 0 && errno == EINTR { continue }
                        if w < 0 { throw BenchFailure("writev: errno \(errno)") }
                        left -= w
                        var skip = w
                        var rest: [iovec] = []
                        for v in iov {
                            if skip >= v.iov_len { skip -= v.iov_len; continue }
                            rest.append(iovec(iov_base: v.iov_base! + skip, iov_len: v.iov_len - skip))
                            skip = 0
                        }
                        iov = rest
                    }
                }
            }
            k += 1
        }
        shutdown(dst, Int32(SHUT_WR))
        frames.add(k, ordering: .relaxed)
        copied.add(reader.statistics.bytesCopied, ordering: .relaxed)
    }
    return ServeOutcome(
        frames: frames.load(ordering: .relaxed), syscalls: nil, note: "\(conns.count) threads: ExactReader + writev(2)",
        bytesCopied: copied.load(ordering: .relaxed))
}

/// reply-swift-nio-N: the accepted connections handed to the NIO peer as descriptors 3, 4, …;
/// it answers every frame and reports its own clock, CPU and memory. `client` is the reply
/// client's pid (waited for here).
func runReplyPeer(_ c: BenchCase, _ conns: [Int32], client: pid_t) throws -> CaseResult {
    let (program, prefix) = try peerProgram(c.strategy)
    let args = prefix + [c.strategy, c.transport, String(c.frameBytes), String(c.frames), String(c.connections)]
    var p: [Int32] = [0, 0]
    guard pipe(&p) == 0 else { throw BenchFailure("pipe: errno \(errno)") }
    let pid = try spawn(program, args, passFDs: conns, stdoutFD: p[1])
    close(p[1])
    let out = readToEnd(closing: p[0])
    let status = waitExit(pid)
    let clientStatus = waitExit(client)
    guard status == 0 else { throw BenchFailure("\(c.strategy) exited with \(status)") }
    guard clientStatus == 0 else { throw BenchFailure("\(c.strategy): the reply client exited with \(clientStatus)") }
    var r = try JSONDecoder().decode(CaseResult.self, from: Data(out))
    guard r.frames == c.frames else { throw BenchFailure("\(c.strategy) answered \(r.frames) frames, expected \(c.frames)") }
    r.connections = c.connections
    r.many = true
    r.serve = "reply"
    r.rssPerConnection = Double(r.peakRSSBytes - r.baselineRSSBytes) / Double(c.connections)
    return r
}

// MARK: - The peers

/// --reply-client TRANSPORT BYTES CONNECTIONS FRAMES --port P
func runReplyClient(transport: String, n: Int, connections: Int, frames: Int, port: UInt16?, path: String?) throws {
    signal(SIGPIPE, SIG_IGN)
    let fds = try (0..<connections).map { _ in try connectPeer(transport, port: port, path: path) }
    defer { for fd in fds { close(fd) } }
    var st = exio_reply_stats()
    let acked = fds.withUnsafeBufferPointer {
        exio_reply_client($0.baseAddress, Int32(connections), UInt64(n), Int64(frames / connections), Int32(replyWindow), &st)
    }
    guard acked == Int64(frames / connections * connections) else {
        throw BenchFailure("reply client: \(acked < 0 ? String(cString: strerror(Int32(-acked))) : "\(acked) acks")")
    }
}

/// --sink TRANSPORT CONNECTIONS BYTES --port P: reads every connection to its end, discarding;
/// fails unless BYTES arrived in all.
func runSink(transport: String, connections: Int, expected: Int, port: UInt16?, path: String?) throws {
    let fds = try (0..<connections).map { _ in try connectPeer(transport, port: port, path: path) }
    var pfds = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
    var open = connections
    var total = 0
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buffer.deallocate() }
    while open > 0 {
        guard poll(&pfds, nfds_t(pfds.count), 20_000) > 0 else { throw BenchFailure("sink: no progress for 20 s") }
        for i in pfds.indices where pfds[i].fd >= 0 && pfds[i].revents != 0 {
            let got = read(pfds[i].fd, buffer, 1 << 20)
            if got < 0 && errno == EINTR { continue }
            if got <= 0 {
                close(pfds[i].fd)
                pfds[i].fd = -1
                open -= 1
            } else {
                total += got
            }
        }
    }
    guard total == expected else { throw BenchFailure("sink: \(total) bytes, expected \(expected)") }
}

func connectPeer(_ transport: String, port: UInt16?, path: String?) throws -> Int32 {
    guard transport == "tcp" else { throw BenchFailure("serving cases run over tcp") }
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var addr = loopbackAddress(port: port ?? 0)
    guard withSockaddr(&addr, { connect(fd, $0, $1) }) == 0 else { throw BenchFailure("connect: errno \(errno)") }
    var one: Int32 = 1
    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    return fd
}

// MARK: - SEND vs SEND_ZC (bench --zero-copy)

/// The measurement behind `AsyncExactWriter.automaticZeroCopyThreshold`: 1 GiB over one loopback
/// TCP connection per size and mode, one send in flight; prints a table.
func runZeroCopyMeasurement(total: Int = 1 << 30) -> Int32 {
    guard exio_ceiling_uring_available() != 0 else {
        log("--zero-copy needs io_uring")
        return 1
    }
    let sizes = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
    let modes = ["send", "send-zc", "send-zc-fixed"]
    print("SEND vs SEND_ZC over loopback TCP, one send in flight, \(fmtBytes(total)) per row")
    print("  size      mode            GB/s   ×send   sender s/GiB   receiver s/GiB   total s/GiB   ×send CPU   completions/send")
    for size in sizes {
        var base: (gb: Double, cpu: Double)? = nil
        for (mode, name) in modes.enumerated() {
            var r = exio_zc_result()
            let ret = exio_zc_measure(UInt64(size), Int64(total), Int32(mode), &r)
            if ret < 0 {
                print("  " + pad(sizeLabel(size), 9) + " " + pad(name, 14) + "  refused: \(String(cString: strerror(-ret)))")
                continue
            }
            let gib = Double(r.bytes) / Double(1 << 30)
            let gb = Double(r.bytes) / r.seconds / 1e9
            let cpu = (r.sender_cpu + r.receiver_cpu) / gib
            if mode == 0 { base = (gb, cpu) }
            print("  " + pad(sizeLabel(size), 9) + " " + pad(name, 14)
                + String(format: " %6.2f  %6.2f   %12.3f   %14.3f   %11.3f   %9.2f   %16.2f",
                         gb, gb / (base?.gb ?? gb), r.sender_cpu / gib, r.receiver_cpu / gib, cpu, cpu / (base?.cpu ?? cpu),
                         Double(r.completions) / Double(max(r.sends, 1))))
        }
    }
    return 0
}

// MARK: - The table

/// Serving cases: CPU seconds per GiB of bodies, and GB/s and CPU per GiB as multiples of the
/// C row of the same case (`reply-c`, `relay-c`): ×ceiling and CPU×ceil, as in the
/// many-connection table.
func addServeRatios(_ results: inout [CaseResult]) {
    let serve = results.indices.filter { results[$0].serve != nil }
    for i in serve {
        let gib = Double(results[i].frames) * Double(results[i].frameBytes) / Double(1 << 30)
        results[i].cpuSecondsPerGiB = gib > 0 ? (results[i].cpuUserSeconds + results[i].cpuSystemSeconds) / gib : nil
    }
    for i in serve {
        let r = results[i]
        let ceiling = r.serve == "reply" ? "reply-c" : "relay-c"
        guard let c = results.first(where: { $0.strategy == ceiling && $0.connections == r.connections && $0.frameBytes == r.frameBytes })
        else { continue }
        results[i].ceilingStrategy = ceiling
        results[i].ceilingRatio = r.gbPerSecond / c.gbPerSecond
        if let cpu = r.cpuSecondsPerGiB, let base = c.cpuSecondsPerGiB, base > 0 {
            results[i].cpuCeilingRatio = cpu / base
        }
    }
}

/// 2 for the rows that use both cores of this machine (a thread per connection, two event
/// loops), 1 for the rest: ×NIO compares a row with reply-swift-nio-N of its class.
func serveThreadClass(_ s: String) -> Int {
    s.hasSuffix("-threads") || s.hasSuffix("-nio-2") ? 2 : 1
}

func renderServeTable(_ results: [CaseResult]) -> String {
    var out = ""
    for kind in ["reply", "relay"] {
        let rows = results.filter { $0.serve == kind }
            .sorted { (serveStrategies.firstIndex(of: $0.strategy) ?? 99) < (serveStrategies.firstIndex(of: $1.strategy) ?? 99) }
        guard let first = rows.first else { continue }
        func rate(_ strategy: String) -> Double? { rows.first { $0.strategy == strategy }?.framesPerSecond }
        let ceiling = rows.compactMap(\.ceilingStrategy).first.map { " (ceiling: \($0))" } ?? " (no C ceiling in this run)"
        out += kind == "reply"
            ? "\nreply: \(first.transport), \(sizeLabel(first.frameBytes)) frames × \(first.frames) over \(first.connections) connections, each answered with an 8-byte ack (client window \(replyWindow))\(ceiling)\n"
            : "\nrelay: \(first.transport), \(sizeLabel(first.frameBytes)) frames × \(first.frames) over \(first.connections) connections, each sent on to a sink connection\(ceiling)\n"
        out += "  strategy              thr      GB/s  (min-max)        frames/s  ×ceiling   ×NIO  ×threads  CPU s/GiB  CPU×ceil  peak growth     copied   zero-copy  syscalls/frame\n"
        let threads = rate(kind + "-threads")
        for r in rows {
            func ratio(_ base: Double?, _ width: Int) -> String {
                base.map { String(format: "%\(width).2f", r.framesPerSecond / $0) } ?? pad("-", width, right: true)
            }
            out += "  " + pad(r.strategy, 21) + " " + pad(serveThreadsLabel(r.strategy, connections: r.connections), 6)
                + String(format: " %6.2f ", r.gbPerSecond)
                + pad(r.gbPerSecondMin.map { String(format: "(%.2f-%.2f)", $0, r.gbPerSecondMax ?? $0) } ?? "", 14)
                + String(format: " %10.0f  ", r.framesPerSecond)
                + (r.ceilingRatio.map { String(format: "%8.2f", $0) } ?? pad("-", 8, right: true))
                + "  " + ratio(rate("reply-swift-nio-\(serveThreadClass(r.strategy))"), 5) + "  " + ratio(threads, 8)
                + "  " + (r.cpuSecondsPerGiB.map { String(format: "%9.3f", $0) } ?? pad("-", 9, right: true))
                + "  " + (r.cpuCeilingRatio.map { String(format: "%8.2f", $0) } ?? pad("-", 8, right: true))
                + "  " + pad(fmtBytes(r.peakRSSBytes - r.baselineRSSBytes), 11, right: true)
                + "  " + pad(r.bytesCopied.map(fmtBytes) ?? "-", 9, right: true)
                + "  " + pad(r.bytesSentZeroCopy.map(fmtBytes) ?? "-", 10, right: true)
                + "  " + pad(r.syscallsPerFrame.map { String(format: "%.3f", $0) } ?? "-", 14, right: true) + "\n"
        }
    }
    if !out.isEmpty {
        out += """

            reply, relay: ×ceiling is GB/s over the one-thread C row of the case (reply-c: epoll, one read(2) \
            per ready connection, the acks of a read in one write(2); relay-c: epoll, read(2) then send(2) \
            through a 256 KiB buffer); CPU s/GiB is the server process's user+sys seconds per GiB of bodies \
            (receiving and sending; peers: the peer process), CPU×ceil that over the C row's. ×NIO, ×threads: \
            frames/s over reply-swift-nio-N (N = 1 for one-loop rows, 2 for the thread-per-connection rows) \
            and over the thread-per-connection row. copied: the readers' user-space copies (ExactIO's \
            statistics.bytesCopied); zero-copy: bytes sent with SEND_ZC.

            """
    }
    return out
}
