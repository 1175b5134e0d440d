@_spi(Testing) import ExactIO
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization
import SystemPackage

// Probes (`bench --probe NAME`): the defects of issue 16 ("A server on IOLoop survives signals,
// floods and trickling peers"), each as a small program with a figure, so that the same
// measurement can be taken before and after the fixes.
//
// Each probe × backend runs in a fresh child process (`--probe-child NAME TARGET`) in a process
// group of its own; its peers (writers, clients, drainers) are further processes of this
// program (`--probe-helper KIND …`) in the same group. The child prints JSON lines on stdout:
// partial figures as it goes, then a final one. The parent enforces a hard wall-time limit per
// child (SIGKILL to the whole group), and reports "crashed (signal N …)" with the child's
// fatal-error line, or "timed out", instead of hanging; the last partial figures are kept.
//
// Only the public API of ExactIO is used (plus `@_spi(Testing)` as elsewhere in the bench), so
// that this file builds unchanged on the fixed library.

// MARK: - Catalogue

struct ProbeSpec: Sendable {
    let name: String
    let what: String
    /// One child per target: a backend ("io_uring", "epoll" for the loop; "io_uring", "posix"
    /// for `ExactReader`), optionally with a variant ("io_uring/room").
    let targets: [String]
    /// Hard wall-time limit of one child, in seconds.
    let limit: Double
}

let probeLoopTargets = ["io_uring", "epoll"]

let probeSpecs: [ProbeSpec] = [
    ProbeSpec(
        name: "signal-storm",
        what: "AsyncExactReader with readTimeout 50 ms (deadline armed, timed loop wait); SIGUSR1 (sigaction handler, no SA_RESTART) sent with pthread_kill to the loop thread every ~20-70 µs for 2 s; then one frame must still arrive",
        targets: probeLoopTargets, limit: 15),
    ProbeSpec(
        name: "varint-trickle-blocking",
        what: "blocking ExactReader, readFrame(prefix: .varint) on a unix socket; a writer process sends 256 KiB of 0x80 one byte per 100 µs (absolute schedule), then 0x00, then closes; the reader reads on after a refusal until the end; reader process CPU (user+sys) at 64/128/192 KiB and in total",
        targets: ["io_uring", "posix"], limit: 45),
    ProbeSpec(
        name: "varint-trickle-loop",
        what: "AsyncExactReader (task on the global executor), readFrame(prefix: .varint); a writer process sends 4 KiB of 0x80 one byte per 5 ms, then 0x00, then closes; the reader reads on after a refusal until the end; reader process CPU at 1/2/3 KiB and in total",
        targets: probeLoopTargets, limit: 35),
    ProbeSpec(
        name: "segment-rss",
        what: "100-byte frames (4-byte BE prefix) on a unix socket, each send = rest of frame k + first byte of frame k+1, paced at 50,000 sends/s for 20 s by a writer process; one reader task on the loop's executor; RSS growth per send (frame read)",
        targets: probeLoopTargets, limit: 35),
    ProbeSpec(
        name: "trickle-65000",
        what: "100 unix connections, frames of 65,000-byte bodies, one byte per send (writer process, non-blocking, round robin, 80,000 sends/s in all) for 20 s; one readFrame task per connection on the loop's executor; RSS growth per byte received (sent minus FIONREAD still queued)",
        targets: probeLoopTargets, limit: 35),
    ProbeSpec(
        name: "forward-wait",
        what: "ExactReader.forward(exactly: 64 KiB) from a non-blocking socketpair to a non-blocking socket: room = destination full but 8 KiB, full = no room (both drained by a peer process from 1 s on), empty-source = source empty until a peer writes at 1 s; CPU and statistics.reads during the call",
        targets: ["io_uring/room", "io_uring/full", "io_uring/empty-source", "posix/room", "posix/full", "posix/empty-source"],
        limit: 15),
    ProbeSpec(
        name: "emfile-accept",
        what: "RLIMIT_NOFILE 256; loop.connections(accepting:) on a TCP listener, a consumer keeps every connection open; a client process opens 400 connections; then 2 s of the loop thread's CPU (/proc/self/task/TID/stat) and loop.statistics.enters",
        targets: probeLoopTargets, limit: 20),
    ProbeSpec(
        name: "accept-flood",
        what: "RLIMIT_NOFILE 20000; an accept iterator that takes the first connection and is then kept alive unconsumed; a client process opens 5,000 TCP connections (non-blocking connects); open descriptors of the reader process 3 s after the client started",
        targets: probeLoopTargets, limit: 20),
    ProbeSpec(
        name: "deadlines",
        what: "one busy unix connection (writer process streaming 64-byte frames), read with readFrame by a task on the loop's executor: frames/s over 3 s and µs per loop turn, first with no other reader, then with 9,000 idle readers (tasks on the loop's executor) each awaiting readFrame with readTimeout 60 s",
        targets: probeLoopTargets, limit: 35),
    ProbeSpec(
        name: "fd-reuse",
        what: "a reader starts reading (readFrame times out after 100 ms: receive armed), its fd is closed, a new socketpair takes the same number (dup2), a second reader starts reading it, the old reader is dropped; does a frame sent on the new connection arrive within 3 s? (the defect is epoll's; io_uring as a control)",
        targets: ["epoll", "io_uring"], limit: 15),
]

/// One probe's result for one target (a table row).
struct ProbeResult: Codable {
    var probe: String
    var target: String
    /// What happened: set by the child, or by the parent ("crashed (signal …)", "timed out …").
    var outcome: String
    /// The figures in words, for the table.
    var summary: String
    /// The same figures as numbers (names in the summary's order are not kept: see `summary`).
    var figures: [String: Double]
    /// Wall time of the child process.
    var seconds: Double
    /// False for a partial result (the child was still running, or died).
    var final: Bool
    /// The 1-minute load average when the child started (other work on the machine skews CPU
    /// and throughput figures).
    var loadAverage: Double? = nil
}

struct ProbeReport: Codable {
    var version = 1
    var date: String
    var command: String
    var probes: [ProbeResult]
}

// MARK: - The parent: one child per probe and target

/// `--probe NAME …`: runs the probes, prints a markdown table (and `--json FILE`). Returns the
/// exit status (0 even when probes show defects: that is what they are for).
func runProbes(_ requested: [String], jsonPath: String?) -> Int32 {
    if requested.contains("list") {
        for s in probeSpecs {
            print("\(pad(s.name, 24)) targets: \(s.targets.joined(separator: ", ")); limit \(Int(s.limit)) s per target")
            print("    \(s.what)")
        }
        return 0
    }
    var specs: [ProbeSpec] = []
    for name in requested {
        let add = name == "all" ? probeSpecs : probeSpecs.filter { $0.name == name }
        if add.isEmpty {
            log("bench: unknown probe '\(name)'; known: all, list, \(probeSpecs.map(\.name).joined(separator: ", "))")
            return 2
        }
        for s in add where !specs.contains(where: { $0.name == s.name }) { specs.append(s) }
    }
    #if DEBUG
    log("WARNING: this is a debug build; CPU figures are not comparable. Use: swift run -c release bench --probe …")
    #endif
    var results: [ProbeResult] = []
    let start = now()
    for spec in specs {
        for target in spec.targets {
            log(String(format: "[probe %6.1fs] ", now() - start) + "\(spec.name) \(target) (limit \(Int(spec.limit)) s)")
            let r = runProbeProcess(spec, target)
            log("  => \(r.outcome) | \(r.summary)")
            results.append(r)
        }
    }
    print(renderProbeTable(results))
    if let jsonPath {
        let command = (["swift run -c release bench"] + CommandLine.arguments.dropFirst()).joined(separator: " ")
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        do {
            let data = try enc.encode(ProbeReport(date: ISO8601DateFormatter().string(from: Date()), command: command, probes: results))
            try data.write(to: URL(fileURLWithPath: jsonPath))
            log("wrote \(jsonPath)")
        } catch {
            log("bench: writing \(jsonPath): \(error)")
            return 1
        }
    }
    log(String(format: "%d probe runs in %.1f s", results.count, now() - start))
    return 0
}

func renderProbeTable(_ results: [ProbeResult]) -> String {
    func cell(_ s: String) -> String { s.replacingOccurrences(of: "|", with: "\\|").replacingOccurrences(of: "\n", with: " ") }
    var out = "| probe | backend | outcome | figures | s | load |\n|---|---|---|---|---|---|\n"
    for r in results {
        let load = r.loadAverage.map { String(format: "%.1f", $0) } ?? "-"
        out += "| \(r.probe) | \(r.target) | \(cell(r.outcome)) | \(cell(r.summary)) | \(String(format: "%.1f", r.seconds)) | \(load) |\n"
    }
    return out
}

/// Spawns `path args` as the leader of a new process group, stdout and stderr to the given
/// descriptors.
func spawnInNewGroup(_ path: String, _ args: [String], stdoutFD: Int32, stderrFD: Int32) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, stdoutFD, 1)
    posix_spawn_file_actions_adddup2(&actions, stderrFD, 2)
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP))
    posix_spawnattr_setpgroup(&attr, 0)
    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, &actions, &attr, argv, environ)
    guard rc == 0 else { throw BenchFailure("posix_spawn \(path): errno \(rc)") }
    return pid
}

/// True once `pid` has exited (a zombie not yet reaped, so its group id stays ours).
func isZombie(_ pid: pid_t) -> Bool {
    guard let text = readSmallFile("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return true }
    let rest = text[text.index(after: close)...].drop { $0 == " " }
    return rest.first == "Z" || rest.first == "X"
}

let signalNames: [Int32: String] = [
    1: "SIGHUP", 2: "SIGINT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL",
    10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM",
]

/// Runs one probe child under its time limit and turns what it printed (or how it died) into
/// a result.
func runProbeProcess(_ spec: ProbeSpec, _ target: String) -> ProbeResult {
    var result = ProbeResult(probe: spec.name, target: target, outcome: "", summary: "", figures: [:], seconds: 0, final: false)
    var out: [Int32] = [0, 0]
    var err: [Int32] = [0, 0]
    do {
        let o = try cloexecPipe(), e = try cloexecPipe()
        out = [o.read, o.write]
        err = [e.read, e.write]
    } catch {
        result.outcome = "not run: \(error)"
        return result
    }
    let load = readSmallFile("/proc/loadavg").flatMap { Double($0.split(separator: " ").first ?? "") }
    let t0 = now()
    let pid: pid_t
    do {
        pid = try spawnInNewGroup(selfPath, ["--probe-child", spec.name, target], stdoutFD: out[1], stderrFD: err[1])
    } catch {
        result.outcome = "not run: \(error)"
        return result
    }
    close(out[1])
    close(err[1])
    var outBuf: [UInt8] = []
    var errBuf: [UInt8] = []
    var errLines: [String] = []
    var last: ProbeResult? = nil
    var outOpen = true, errOpen = true
    var ended: Double? = nil  // when the child was seen exited, or was killed
    var timedOut = false
    var buf = [UInt8](repeating: 0, count: 65536)

    func takeLines(_ data: inout [UInt8], _ body: (String) -> Void) {
        while let nl = data.firstIndex(of: 10) {
            body(String(decoding: data[..<nl], as: UTF8.self))
            data.removeSubrange(...nl)
        }
    }
    while true {
        if ended == nil {
            if isZombie(pid) {
                ended = now()
                kill(-pid, SIGKILL)  // helpers the child left behind
            } else if now() - t0 > spec.limit {
                timedOut = true
                ended = now()
                kill(-pid, SIGKILL)
            }
        }
        if let ended, (!outOpen && !errOpen) || now() - ended > 1.0 { break }
        var pfds: [pollfd] = []
        if outOpen { pfds.append(pollfd(fd: out[0], events: Int16(POLLIN), revents: 0)) }
        if errOpen { pfds.append(pollfd(fd: err[0], events: Int16(POLLIN), revents: 0)) }
        if pfds.isEmpty {
            usleep(20_000)
            continue
        }
        _ = poll(&pfds, nfds_t(pfds.count), 100)
        for p in pfds where p.revents != 0 {
            let n = read(p.fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                if p.fd == out[0] { outOpen = false } else { errOpen = false }
                continue
            }
            if p.fd == out[0] {
                outBuf += buf[0..<n]
                takeLines(&outBuf) { line in
                    if let r = try? JSONDecoder().decode(ProbeResult.self, from: Data(line.utf8)) { last = r }
                }
            } else {
                errBuf += buf[0..<n]
                takeLines(&errBuf) { line in
                    log("    | " + line)
                    errLines.append(line)
                    if errLines.count > 200 { errLines.removeFirst() }
                }
            }
        }
    }
    if !errBuf.isEmpty { errLines.append(String(decoding: errBuf, as: UTF8.self)) }
    close(out[0])
    close(err[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    kill(-pid, SIGKILL)

    if let last { result = last }
    result.probe = spec.name
    result.target = target
    result.seconds = now() - t0
    result.loadAverage = load
    let sig = status & 0x7f
    let code = (status >> 8) & 0xff
    let partial = last != nil && last?.final != true ? " (figures: last partial report)" : ""
    if timedOut {
        result.outcome = "timed out (killed after \(Int(spec.limit)) s)" + partial
        result.final = false
    } else if sig != 0 {
        result.outcome = "crashed (signal \(sig) \(signalNames[sig] ?? "")): \(crashLine(errLines))" + partial
        result.final = false
    } else if code != 0 || last?.final != true {
        result.outcome = "failed (exit \(code)): \(crashLine(errLines))" + partial
        result.final = false
    }
    return result
}

/// The line that says why a child died: Swift's "Fatal error: …", else the last line.
func crashLine(_ lines: [String]) -> String {
    for line in lines.reversed() {
        if let r = line.range(of: "Fatal error") { return String(line[r.lowerBound...].prefix(200)) }
    }
    for line in lines.reversed() where line.contains("error") || line.contains("Assertion") {
        return String(line.prefix(200))
    }
    return String((lines.last { !$0.isEmpty } ?? "no message").prefix(200))
}

// MARK: - The child: one probe, one target

/// Prints a probe's results, partial or final, as JSON lines on stdout.
final class ProbeReporter: Sendable {
    let probe: String
    let target: String
    let t0 = now()

    init(probe: String, target: String) {
        self.probe = probe
        self.target = target
    }

    func emit(_ outcome: String, _ summary: String, _ figures: [String: Double] = [:], final: Bool = false) {
        let clean = figures.mapValues { $0.isFinite ? $0 : -1 }
        let r = ProbeResult(probe: probe, target: target, outcome: outcome, summary: summary, figures: clean, seconds: now() - t0, final: final)
        guard var data = try? JSONEncoder().encode(r) else { return }
        data.append(10)
        data.withUnsafeBytes { p in
            var off = 0
            while off < p.count {
                let n = write(1, p.baseAddress! + off, p.count - off)
                if n <= 0 {
                    if n < 0 && errno == EINTR { continue }
                    return
                }
                off += n
            }
        }
    }
}

/// `--probe-child NAME TARGET`.
func runProbeChildMode(_ args: [String]) -> Never {
    guard args.count >= 2 else {
        log("bench: --probe-child needs NAME TARGET; got \(args.joined(separator: " "))")
        Glibc.exit(2)
    }
    signal(SIGPIPE, SIG_IGN)
    let rep = ProbeReporter(probe: args[0], target: args[1])
    let target = args[1]
    do {
        switch args[0] {
        case "signal-storm": try probeSignalStorm(target, rep)
        case "varint-trickle-blocking": try probeVarintTrickleBlocking(target, rep)
        case "varint-trickle-loop": try probeVarintTrickleLoop(target, rep)
        case "segment-rss": try probeSegmentRSS(target, rep)
        case "trickle-65000": try probeTrickle65000(target, rep)
        case "forward-wait": try probeForwardWait(target, rep)
        case "emfile-accept": try probeEmfileAccept(target, rep)
        case "accept-flood": try probeAcceptFlood(target, rep)
        case "deadlines": try probeDeadlines(target, rep)
        case "fd-reuse": try probeFDReuse(target, rep)
        default:
            rep.emit("unknown probe", "", final: true)
            Glibc.exit(2)
        }
    } catch {
        rep.emit("error: \(error)", "", final: true)
    }
    Glibc.exit(0)
}

// MARK: - Helpers for the probes

func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    return preadText(fd)
}

/// The whole text of an open /proc file, read again from offset 0 (a descriptor opened in
/// advance still works when the process is out of descriptors).
func preadText(_ fd: Int32) -> String? {
    var buf = [UInt8](repeating: 0, count: 16384)
    let n = pread(fd, &buf, buf.count, 0)
    guard n > 0 else { return nil }
    return String(decoding: buf[0..<n], as: UTF8.self)
}

func probeSocketPair() throws -> (Int32, Int32) {
    var sv: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
        throw BenchFailure("socketpair: errno \(errno)")
    }
    return (sv[0], sv[1])
}

/// A TCP connection over loopback (client end, server end), both with SO_SNDBUF and
/// SO_RCVBUF of `bufferBytes` when given, and TCP_NODELAY.
func tcpPair(bufferBytes: Int32? = nil) throws -> (Int32, Int32) {
    let l = try manyListener("tcp")
    defer { close(l.fd) }
    let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard c >= 0 else { throw BenchFailure("socket: errno \(errno)") }
    func configure(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        if var b = bufferBytes {
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &b, socklen_t(MemoryLayout<Int32>.size))
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &b, socklen_t(MemoryLayout<Int32>.size))
        }
    }
    configure(c)
    var addr = loopbackAddress(port: UInt16(l.args[1])!)
    guard withSockaddr(&addr, { connect(c, $0, $1) }) == 0 else { throw BenchFailure("connect: errno \(errno)") }
    let s = accept(l.fd, nil, nil)
    guard s >= 0 else { throw BenchFailure("accept: errno \(errno)") }
    _ = fcntl(s, F_SETFD, FD_CLOEXEC)
    configure(s)
    return (c, s)
}

func setNonBlocking(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
}

/// Sets the soft RLIMIT_NOFILE (at most the hard limit); returns what it is now.
@discardableResult
func setNoFile(_ n: Int) -> Int {
    var r = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &r)
    if n > Int(clamping: r.rlim_max) {
        // Root (or CAP_SYS_RESOURCE) may raise the hard limit too.
        var raised = rlimit(rlim_cur: rlim_t(n), rlim_max: rlim_t(n))
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { return n }
    }
    r.rlim_cur = rlim_t(min(n, Int(clamping: r.rlim_max)))
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &r)
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &r)
    return Int(clamping: r.rlim_cur)
}

func processCPU() -> Double {
    let c = cpuTimes()
    return c.user + c.sys
}

/// The calling thread's kernel id (from /proc/thread-self → "PID/task/TID").
func currentTID() -> Int32 {
    var buf = [CChar](repeating: 0, count: 256)
    let n = readlink("/proc/thread-self", &buf, 255)
    guard n > 0 else { return -1 }
    let s = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return Int32(s.split(separator: "/").last ?? "") ?? -1
}

/// user+sys seconds of one thread, from an open /proc/self/task/TID/stat.
func threadCPUSeconds(statFD fd: Int32) -> Double {
    guard let text = preadText(fd), let close = text.lastIndex(of: ")") else { return -1 }
    let fields = text[text.index(after: close)...].split(separator: " ")
    // After the command: field 3 (state) is fields[0]; utime (14) and stime (15).
    guard fields.count > 12, let u = Double(fields[11]), let s = Double(fields[12]) else { return -1 }
    return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

func rssBytes() -> Int { procStatusBytes("VmRSS") }

/// Entries of an open directory stream of /proc/self/fd (rewound each time), less its own.
func openFDCount(_ dir: OpaquePointer) -> Int {
    rewinddir(dir)
    var n = 0
    while let e = readdir(dir) {
        let first = withUnsafeBytes(of: e.pointee.d_name) { $0[0] }
        if first != UInt8(ascii: ".") { n += 1 }
    }
    return n - 1
}

func probeLoop(_ target: String) throws -> IOLoop {
    let backend: ExactReader.Backend = target.hasPrefix("io_uring") ? .ioUring : .posix
    return try IOLoop(options: .init(backend: backend))
}

struct LoopThreadID: Sendable {
    let thread: pthread_t
    let tid: Int32
}

/// The loop's thread, found by running a job on it (the loop is a TaskExecutor).
func loopThread(_ loop: IOLoop) throws -> LoopThreadID {
    try blockingAwait {
        await Task(executorPreference: loop) { LoopThreadID(thread: pthread_self(), tid: currentTID()) }.value
    }
}

/// Spawns a probe helper (this program, `--probe-helper ARGS`): `passFDs` become its
/// descriptors 3, 4, …; stdout goes to `stdoutFD` (default: our stderr, so that it never mixes
/// with the JSON lines).
func spawnHelper(_ args: [String], passFDs: [Int32] = [], stdinFD: Int32? = nil, stdoutFD: Int32? = nil) throws -> pid_t {
    try spawn(selfPath, ["--probe-helper"] + args, passFDs: passFDs, stdinFD: stdinFD, stdoutFD: stdoutFD ?? 2)
}

/// A pipe whose ends are close-on-exec (so that only the intended ends reach a helper).
func cloexecPipe() throws -> (read: Int32, write: Int32) {
    var p: [Int32] = [0, 0]
    guard pipe(&p) == 0 else { throw BenchFailure("pipe: errno \(errno)") }
    for fd in p { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    return (p[0], p[1])
}

/// Reads lines from `fd` until one starts with `prefix` or `timeout` seconds pass.
func readLine(from fd: Int32, prefix: String, timeout: Double) -> String? {
    let end = now() + timeout
    var data: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while now() < end {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ms = Int32(max(1, (end - now()) * 1000))
        guard poll(&p, 1, ms) > 0 else { continue }
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return nil }
        data += buf[0..<n]
        while let nl = data.firstIndex(of: 10) {
            let line = String(decoding: data[..<nl], as: UTF8.self)
            data.removeSubrange(...nl)
            if line.hasPrefix(prefix) { return line }
        }
    }
    return nil
}

func sleepUntil(_ t: Double) {
    var ts = timespec(tv_sec: Int(t), tv_nsec: Int((t - t.rounded(.down)) * 1e9))
    while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
}

func sleepSeconds(_ s: Double) { sleepUntil(now() + s) }

func fmt(_ x: Double, _ digits: Int = 2) -> String { String(format: "%.\(digits)f", x) }

func fmtMB(_ bytes: Double) -> String { String(format: "%+.1f MB", bytes / 1e6) }

/// Runs `body` on a new thread.
func startThread(_ body: @escaping @Sendable () -> Void) {
    let t = Thread { body() }
    t.stackSize = 1 << 20
    t.start()
}

/// A CPU curve: process CPU when the writer's schedule reaches each checkpoint (in bytes).
final class CPUCurve: Sendable {
    let points = Mutex<[(bytes: Int, cpu: Double)]>([])
    let done = Atomic<Bool>(false)

    var text: String {
        points.withLock { $0.map { "\(sizeLabel($0.bytes)) \(fmt($0.cpu)) s" }.joined(separator: ", ") }
    }

    var figures: [String: Double] {
        points.withLock { p in Dictionary(uniqueKeysWithValues: p.map { ("cpuSecondsAt\($0.bytes)", $0.cpu) }) }
    }

    /// Samples the process CPU (minus `cpu0`) at `start + checkpoint × interval` (the writer's
    /// absolute schedule), and reports partial figures every 2 s, so that a run killed at its
    /// limit still says how far it got.
    func sample(_ rep: ProbeReporter, start: Double, interval: Double, checkpoints: [Int], total: Int, cpu0: Double) {
        startThread { [self] in
            var next = 0
            var lastReport = now()
            while !done.load(ordering: .relaxed) {
                usleep(10_000)
                let t = now()
                if next < checkpoints.count && t >= start + Double(checkpoints[next]) * interval {
                    let c = processCPU() - cpu0
                    let b = checkpoints[next]
                    points.withLock { $0.append((b, c)) }
                    next += 1
                }
                if t - lastReport >= 2 {
                    lastReport = t
                    let sent = min(total, max(0, Int((t - start) / interval)))
                    let c = processCPU() - cpu0
                    var f = figures
                    f["bytesSentSoFar"] = Double(sent)
                    f["cpuSecondsSoFar"] = c
                    rep.emit(
                        "running", "CPU \(fmt(c)) s after \(sent) bytes sent (\(fmt(t - start, 1)) s); at checkpoints: \(text)", f)
                }
            }
        }
    }
}

// MARK: - 1. signal-storm

let probeSignalsHandled = Atomic<Int>(0)

/// A SIGUSR1 handler that counts, installed without SA_RESTART (interrupted system calls fail
/// with EINTR), as an application's handler would be.
func installCountingHandler(_ sig: Int32) {
    _ = probeSignalsHandled.load(ordering: .relaxed)  // initialized before any handler runs
    var sa = sigaction()
    sa.__sigaction_handler.sa_handler = { _ in probeSignalsHandled.add(1, ordering: .relaxed) }
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0
    sigaction(sig, &sa, nil)
}

final class StormState: Sendable {
    let stop = Atomic<Bool>(false)
    let timeouts = Atomic<Int>(0)
    let frames = Atomic<Int>(0)
    let failure = Mutex<String?>(nil)
}

func probeSignalStorm(_ target: String, _ rep: ProbeReporter) throws {
    installCountingHandler(SIGUSR1)
    let loop = try probeLoop(target)
    let lt = try loopThread(loop)
    let (a, b) = try probeSocketPair()
    let st = StormState()
    Task {
        do {
            let reader = try AsyncExactReader(FileDescriptor(rawValue: a), loop: loop, options: .init(readTimeout: .milliseconds(50)))
            while true {
                do {
                    guard try await reader.readFrame() != nil else { return }
                    st.frames.add(1, ordering: .relaxed)
                    if st.stop.load(ordering: .relaxed) { return }
                } catch let e as Errno where e == .timedOut {
                    st.timeouts.add(1, ordering: .relaxed)
                }
            }
        } catch {
            st.failure.withLock { $0 = "\(error)" }
        }
    }
    usleep(300_000)  // the reader waits, its deadline armed: the loop's wait is a timed one
    var sent = 0
    let t0 = now()
    var nextReport = t0
    rep.emit("storm starting", "0 signals sent yet", ["signalsSent": 0])
    var gap = timespec(tv_sec: 0, tv_nsec: 20_000)
    func figures() -> [String: Double] {
        ["signalsSent": Double(sent), "signalsHandled": Double(probeSignalsHandled.load(ordering: .relaxed)),
         "readTimeouts": Double(st.timeouts.load(ordering: .relaxed))]
    }
    while now() - t0 < 2.0 {
        if pthread_kill(lt.thread, SIGUSR1) == 0 { sent += 1 }
        nanosleep(&gap, nil)
        if now() >= nextReport {
            nextReport += 0.1
            rep.emit("storm under way", "\(sent) signals sent to the loop thread in \(fmt(now() - t0, 1)) s", figures())
        }
    }
    let stormSeconds = now() - t0
    // Still alive: does the reader still read?
    usleep(100_000)
    st.stop.store(true, ordering: .relaxed)
    try Marks.frame(8).withUnsafeBytes { try writeAll(b, $0.baseAddress!, $0.count) }
    let end = now() + 2
    while st.frames.load(ordering: .relaxed) == 0 && st.failure.withLock({ $0 }) == nil && now() < end { usleep(1000) }
    var f = figures()
    f["stormSeconds"] = stormSeconds
    f["framesAfterStorm"] = Double(st.frames.load(ordering: .relaxed))
    let failure = st.failure.withLock { $0 }
    let outcome: String
    if let failure {
        outcome = "survived, but the reader failed: \(failure)"
    } else if st.frames.load(ordering: .relaxed) == 0 {
        outcome = "survived, but no frame arrived within 2 s after the storm"
    } else {
        outcome = "survived (reader still reads)"
    }
    rep.emit(
        outcome,
        "\(sent) SIGUSR1 to the loop thread in \(fmt(stormSeconds, 1)) s (\(Int(f["signalsHandled"]!)) handled); \(Int(f["readTimeouts"]!)) read timeouts",
        f, final: true)
}

// MARK: - 2, 3. varint trickle

/// How a varint trickle went for the reader: frameTooLarge refusals, frames, and how it ended.
/// The probes read on after a refusal until the end of the stream, so that the CPU figure
/// covers the whole trickle whether the reader refuses the prefix at its end (as today) or as
/// soon as it is overlong.
struct VarintOutcome: Sendable {
    var refusals = 0
    var frames = 0
    var ending = "end of stream"

    var text: String {
        var parts: [String] = []
        if refusals > 0 { parts.append("refused \(refusals == 1 ? "the prefix" : "\(refusals) prefixes") (frameTooLarge)") }
        if frames > 0 { parts.append("\(frames) frames (unexpected)") }
        parts.append(ending)
        return parts.joined(separator: ", then ")
    }

    /// Records one readFrame outcome; false when reading should stop.
    mutating func record(_ frame: ByteView??, error: (any Error)?) -> Bool {
        if let error {
            if case ExactReadError.frameTooLarge = error {
                refusals += 1
                return true
            }
            ending = "threw \(error)"
            return false
        }
        if case .some(.some) = frame {
            frames += 1
            return true
        }
        return false  // clean end of stream
    }
}

func probeVarintTrickleBlocking(_ target: String, _ rep: ProbeReporter) throws {
    let total = 256 << 10
    let intervalMicros = 100
    let interval = Double(intervalMicros) / 1e6
    let (a, b) = try probeSocketPair()
    let reader = try ExactReader(FileDescriptor(rawValue: a), options: .init(backend: target == "io_uring" ? .ioUring : .posix))
    let start = now() + 0.5
    _ = try spawnHelper(["trickle", "128", String(total), String(intervalMicros), "0", String(start)], passFDs: [b])
    close(b)
    let curve = CPUCurve()
    let cpu0 = processCPU()
    curve.sample(rep, start: start, interval: interval, checkpoints: [64 << 10, 128 << 10, 192 << 10], total: total, cpu0: cpu0)
    var outcome = VarintOutcome()
    while true {
        do {
            let f = try reader.readFrame(prefix: .varint)
            if !outcome.record(f, error: nil) { break }
        } catch {
            if !outcome.record(nil, error: error) { break }
        }
    }
    let end = now()
    let cpu = processCPU() - cpu0
    curve.done.store(true, ordering: .relaxed)
    let lastByte = start + Double(total + 1) * interval
    var f = curve.figures
    f["cpuSeconds"] = cpu
    f["wallSeconds"] = end - start
    f["lagSeconds"] = end - lastByte
    f["reads"] = Double(reader.statistics.reads)
    f["bytes"] = Double(total + 1)
    f["refusals"] = Double(outcome.refusals)
    rep.emit(
        outcome.text,
        "reader CPU \(fmt(cpu)) s for 256 KiB of 0x80 at 100 µs/byte (wall \(fmt(end - start, 1)) s, done \(fmt(end - lastByte, 2)) s after the last byte; \(reader.statistics.reads) reads); CPU at \(curve.text) [backend \(reader.backend)]",
        f, final: true)
}

func probeVarintTrickleLoop(_ target: String, _ rep: ProbeReporter) throws {
    let total = 4 << 10
    let intervalMicros = 5000
    let interval = Double(intervalMicros) / 1e6
    let loop = try probeLoop(target)
    let (a, b) = try probeSocketPair()
    let start = now() + 0.5
    _ = try spawnHelper(["trickle", "128", String(total), String(intervalMicros), "0", String(start)], passFDs: [b])
    close(b)
    let curve = CPUCurve()
    let cpu0 = processCPU()
    curve.sample(rep, start: start, interval: interval, checkpoints: [1 << 10, 2 << 10, 3 << 10], total: total, cpu0: cpu0)
    let outcome = try blockingAwait { () async throws -> VarintOutcome in
        let reader = try AsyncExactReader(FileDescriptor(rawValue: a), loop: loop)
        var outcome = VarintOutcome()
        while true {
            do {
                let f = try await reader.readFrame(prefix: .varint)
                if !outcome.record(f, error: nil) { break }
            } catch {
                if !outcome.record(nil, error: error) { break }
            }
        }
        return outcome
    }
    let end = now()
    let cpu = processCPU() - cpu0
    curve.done.store(true, ordering: .relaxed)
    let lastByte = start + Double(total + 1) * interval
    let s = loop.statistics
    var f = curve.figures
    f["cpuSeconds"] = cpu
    f["wallSeconds"] = end - start
    f["lagSeconds"] = end - lastByte
    f["loopEnters"] = Double(s.enters)
    f["loopCompletions"] = Double(s.completions)
    f["refusals"] = Double(outcome.refusals)
    rep.emit(
        outcome.text,
        "reader process CPU \(fmt(cpu)) s for 4 KiB of 0x80 at 5 ms/byte (wall \(fmt(end - start, 1)) s, done \(fmt(end - lastByte, 2)) s after the last byte); CPU at \(curve.text) [loop \(loop.backend)]",
        f, final: true)
}

// MARK: - 4. segment-rss

final class CountState: Sendable {
    let frames = Atomic<Int>(0)
    let ready = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    let failure = Mutex<String?>(nil)
    func fail(_ s: String) { failure.withLock { if $0 == nil { $0 = s } } }
}

func probeSegmentRSS(_ target: String, _ rep: ProbeReporter) throws {
    let frameBytes = 100, rate = 50_000, seconds = 20.0
    let loop = try probeLoop(target)
    let (a, b) = try probeSocketPair()
    let st = CountState()
    Task(executorPreference: loop) {
        do {
            let reader = try AsyncExactReader(FileDescriptor(rawValue: a), loop: loop)
            st.ready.add(1, ordering: .relaxed)
            while let f = try await reader.readFrame() {
                if f.count != frameBytes - 4 { st.fail("frame of \(f.count) bytes") }
                st.frames.add(1, ordering: .relaxed)
            }
        } catch {
            // The writer stops after the first byte of a frame: the end is `incomplete`.
            if case ExactReadError.incomplete = error {} else { st.fail("\(error)") }
        }
    }
    while st.ready.load(ordering: .relaxed) == 0 { usleep(1000) }
    let start = now() + 0.5
    _ = try spawnHelper(["split-frames", String(frameBytes), String(rate), String(seconds), String(start)], passFDs: [b])
    close(b)
    sleepUntil(start - 0.1)
    let rss0 = rssBytes()
    let s0 = loop.statistics
    func receives(_ s: IOLoop.Statistics) -> Int {
        // io_uring: a receive is a completion; epoll: a read(2).
        loop.backend == .ioUring ? s.completions - s0.completions : s.reads - s0.reads
    }
    var rss2 = 0, frames2 = 0
    for k in 1...Int(seconds) {
        sleepUntil(start + Double(k) - (k == Int(seconds) ? 0.05 : 0))
        if k == 2 {
            rss2 = rssBytes()
            frames2 = st.frames.load(ordering: .relaxed)
        }
        if k % 5 == 0 && k < Int(seconds) {
            let grow = Double(rssBytes() - rss0)
            let n = st.frames.load(ordering: .relaxed)
            rep.emit(
                "running", "after \(k) s: \(n) sends read, RSS \(fmtMB(grow)) (\(fmt(grow / Double(max(n, 1)), 1)) B/send)",
                ["sends": Double(n), "rssGrowthBytes": grow])
        }
    }
    let rss1 = rssBytes()
    let frames1 = st.frames.load(ordering: .relaxed)
    let s1 = loop.statistics
    let grow = Double(rss1 - rss0)
    let slope = Double(rss1 - rss2) / Double(max(1, frames1 - frames2))
    let recv = receives(s1)
    let f: [String: Double] = [
        "sends": Double(frames1), "receives": Double(recv), "rssGrowthBytes": grow,
        "rssBytesPerSend": grow / Double(max(frames1, 1)), "rssBytesPerReceive": grow / Double(max(recv, 1)),
        "rssBytesPerSendAfter2s": slope, "seconds": seconds,
    ]
    let failure = st.failure.withLock { $0 }
    rep.emit(
        failure.map { "reader failed: \($0)" } ?? "measured",
        "\(frames1) sends (frames read) in \(Int(seconds)) s, \(recv) loop receives: RSS \(fmtMB(grow)) = \(fmt(grow / Double(max(frames1, 1)), 1)) B/send, \(fmt(grow / Double(max(recv, 1)), 1)) B/receive (\(fmt(slope, 1)) B/send from 2 s on)",
        f, final: true)
}

// MARK: - 5. trickle-65000

func probeTrickle65000(_ target: String, _ rep: ProbeReporter) throws {
    // 80,000 one-byte sends a second in all (80 per ms, 800 per connection per second): slow
    // enough that the loop keeps up and each receive holds one byte, as in the issue's run
    // (1.6 MB in 20 s). Unpaced, receives coalesce several bytes and the ratio drops.
    let connections = 100, body = 65_000, seconds = 20.0, rate = 80_000
    setNoFile(4096)
    let loop = try probeLoop(target)
    var readEnds: [Int32] = []
    var writeEnds: [Int32] = []
    for _ in 0..<connections {
        let (r, w) = try probeSocketPair()
        readEnds.append(r)
        writeEnds.append(w)
    }
    let st = CountState()
    for fd in readEnds {
        Task(executorPreference: loop) {
            do {
                let reader = try AsyncExactReader(FileDescriptor(rawValue: fd), loop: loop)
                st.ready.add(1, ordering: .relaxed)
                while let f = try await reader.readFrame() {
                    if f.count != body { st.fail("frame of \(f.count) bytes") }
                    st.frames.add(1, ordering: .relaxed)
                }
            } catch {
                if !st.stop.load(ordering: .relaxed) { st.fail("\(error)") }
            }
        }
    }
    while st.ready.load(ordering: .relaxed) < connections { usleep(1000) }
    usleep(200_000)
    let rss0 = rssBytes()
    // The writer keeps its running count of bytes sent in this file (pwrite at offset 0 after
    // each round over the connections): received = sent - what the sockets still hold.
    let countPath = "/tmp/exactio-probe-\(getpid()).count"
    let countFD = open(countPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard countFD >= 0 else { throw BenchFailure("open \(countPath): errno \(errno)") }
    unlink(countPath)
    let report = try cloexecPipe()
    let hold = try cloexecPipe()
    let start = now() + 0.3
    _ = try spawnHelper(
        ["trickle-many", String(connections), String(seconds), String(start), String(body), String(rate)], passFDs: writeEnds + [countFD],
        stdinFD: hold.read, stdoutFD: report.write)
    for w in writeEnds { close(w) }
    close(report.write)
    close(hold.read)
    func received() -> (sent: Int, received: Int) {
        var sent = 0
        _ = pread(countFD, &sent, MemoryLayout<Int>.size, 0)
        var queued = 0
        for fd in readEnds {
            var n: Int32 = 0
            if ioctl(fd, UInt(FIONREAD), &n) == 0 { queued += Int(n) }
        }
        return (sent, sent - queued)
    }
    var curve: [String] = []
    var f: [String: Double] = [:]
    for k in [2, 5, 10, 15] {
        sleepUntil(start + Double(k))
        let r = received()
        let grow = Double(rssBytes() - rss0)
        let frames = st.frames.load(ordering: .relaxed)
        curve.append("\(k) s: \(fmt(Double(r.received) / 1e6, 2)) MB, \(fmtMB(grow)), \(fmt(grow / Double(max(r.received, 1)), 1)) B/B, \(frames) frames")
        f["bytesReceivedAt\(k)s"] = Double(r.received)
        f["rssGrowthBytesAt\(k)s"] = grow
        f["rssBytesPerByteAt\(k)s"] = grow / Double(max(r.received, 1))
        f["framesAt\(k)s"] = Double(frames)
        rep.emit("running", curve.joined(separator: "; "), f)
    }
    guard readLine(from: report.read, prefix: "sent ", timeout: seconds + 5) != nil else {
        throw BenchFailure("the writer did not finish")
    }
    usleep(300_000)  // the loop takes what is still queued
    let r = received()
    let rss1 = rssBytes()
    let grow = Double(rss1 - rss0)
    let frames = st.frames.load(ordering: .relaxed)
    st.stop.store(true, ordering: .relaxed)
    let s = loop.statistics
    f["bytesSent"] = Double(r.sent)
    f["bytesReceived"] = Double(r.received)
    f["framesRead"] = Double(frames)
    f["rssGrowthBytes"] = grow
    f["rssBytesPerByteReceived"] = grow / Double(max(r.received, 1))
    f["loopCompletions"] = Double(s.completions)
    f["loopReads"] = Double(s.reads)
    f["starvations"] = Double(s.starvations)
    let failure = st.failure.withLock { $0 }
    rep.emit(
        failure.map { "reader failed: \($0)" } ?? "measured",
        "one byte per send on 100 connections, \(rate / 1000) K sends/s for 20 s: \(fmt(Double(r.received) / 1e6, 2)) MB received (of \(fmt(Double(r.sent) / 1e6, 2)) MB sent), \(frames) frames completed, RSS \(fmtMB(grow)) = \(fmt(grow / Double(max(r.received, 1)), 1)) B of RSS per byte received; \(s.starvations) starvations. Received, RSS growth, B/B, frames at \(curve.joined(separator: "; "))",
        f, final: true)
    close(hold.write)
}

// MARK: - 6. forward-wait

func probeForwardWait(_ target: String, _ rep: ProbeReporter) throws {
    let parts = target.split(separator: "/").map(String.init)
    let backend: ExactReader.Backend = parts[0] == "io_uring" ? .ioUring : .posix
    let variant = parts.count > 1 ? parts[1] : "room"
    let count = 64 << 10
    let wait = 1.0
    let (src, srcPeer) = try probeSocketPair()
    // The destination: TCP over loopback with small buffers (16 KiB asked, the kernel doubles
    // them), so that freeing a little room lets a little through. (A unix socket is no good
    // here: spliced pages go through whole once the socket is below its limit at all.)
    let (dst, dstPeer) = try tcpPair(bufferBytes: 16 << 10)
    setNonBlocking(src)
    setNonBlocking(dst)
    let reader = try ExactReader(FileDescriptor(rawValue: src), options: .init(backend: backend))
    let block = [UInt8](repeating: 0x5a, count: 4096)
    var room = 0
    let at = now() + wait
    switch variant {
    case "room", "full":
        let data = [UInt8](repeating: 0x33, count: count)
        try data.withUnsafeBytes { try writeAll(srcPeer, $0.baseAddress!, $0.count) }
        var filled = 0
        while true {
            let n = block.withUnsafeBytes { write(dst, $0.baseAddress!, $0.count) }
            if n <= 0 { break }
            filled += n
        }
        if variant == "room" {
            // Read 4 KiB at a time at the far end until the destination polls writable: the
            // window reopened and the sender's queue moved on, leaving some room (about 24 KiB
            // with these buffers: less than the 64 KiB to forward).
            var sink = [UInt8](repeating: 0, count: 4096)
            for _ in 0..<64 {
                let n = read(dstPeer, &sink, sink.count)
                if n <= 0 { break }
                room += n
                usleep(5000)
                var p = pollfd(fd: dst, events: Int16(POLLOUT), revents: 0)
                if poll(&p, 1, 0) == 1 { break }
            }
        }
        _ = try spawnHelper(["drain-after", String(at)], passFDs: [dstPeer])
        close(dstPeer)
        rep.emit("prepared", "destination filled with \(filled) bytes, \(room) drained")
    default:  // empty-source; the destination is drained from the start (its small buffers
        // could not hold all 64 KiB)
        _ = try spawnHelper(["write-after", String(at), String(count)], passFDs: [srcPeer])
        close(srcPeer)
        _ = try spawnHelper(["drain-after", String(now())], passFDs: [dstPeer])
        close(dstPeer)
    }
    let reads0 = reader.statistics.reads
    let polls0 = reader.statistics.polls
    let cpu0 = processCPU()
    let t0 = now()
    var outcome = "completed"
    do {
        try reader.forward(exactly: count, to: FileDescriptor(rawValue: dst))
    } catch {
        outcome = "threw: \(error)"
    }
    let seconds = now() - t0
    let cpu = processCPU() - cpu0
    let reads = reader.statistics.reads - reads0
    let polls = reader.statistics.polls - polls0
    let f: [String: Double] = [
        "cpuSeconds": cpu, "wallSeconds": seconds, "reads": Double(reads), "polls": Double(polls),
        "destinationRoomBytes": Double(room),
    ]
    let setup = variant == "empty-source"
        ? "empty non-blocking source, written at 1 s"
        : variant == "room" ? "destination full, then \(room) B read at its far end (until writable), drained from 1 s" : "destination full, drained from 1 s"
    rep.emit(
        outcome,
        "\(setup): call took \(fmt(seconds, 3)) s, CPU \(fmt(cpu, 3)) s, statistics.reads \(reads), polls \(polls) [backend \(reader.backend)]",
        f, final: true)
}

// MARK: - 7. emfile-accept

final class AcceptState: Sendable {
    let accepted = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    let failure = Mutex<String?>(nil)
}

func probeEmfileAccept(_ target: String, _ rep: ProbeReporter) throws {
    let limit = setNoFile(256)
    let loop = try probeLoop(target)
    let lt = try loopThread(loop)
    // Opened now: once the loop has taken every descriptor, nothing else can be opened.
    let statFD = open("/proc/self/task/\(lt.tid)/stat", O_RDONLY | O_CLOEXEC)
    guard statFD >= 0, let fdDir = opendir("/proc/self/fd") else { throw BenchFailure("open /proc: errno \(errno)") }
    let listener = try manyListener("tcp")
    let st = AcceptState()
    let lfd = listener.fd
    Task {
        var kept: [FileDescriptor] = []
        do {
            for try await conn in loop.connections(accepting: FileDescriptor(rawValue: lfd)) {
                kept.append(conn)
                st.accepted.add(1, ordering: .relaxed)
            }
        } catch {
            st.failure.withLock { $0 = "\(error)" }
        }
        withExtendedLifetime(kept) {}
    }
    let report = try cloexecPipe()
    let hold = try cloexecPipe()
    _ = try spawnHelper(["connect", listener.args[1], "400"], stdinFD: hold.read, stdoutFD: report.write)
    close(report.write)
    close(hold.read)
    let connected = readLine(from: report.read, prefix: "connected ", timeout: 8) ?? "connected ?"
    // Until the accepted count stops moving (the limit is reached).
    var last = -1
    var stableSince = now()
    let give = now() + 3
    while now() < give {
        let n = st.accepted.load(ordering: .relaxed)
        if n != last {
            last = n
            stableSince = now()
        } else if now() - stableSince > 0.3 {
            break
        }
        usleep(20_000)
    }
    let fds = openFDCount(fdDir)
    let s0 = loop.statistics
    let c0 = threadCPUSeconds(statFD: statFD)
    let p0 = processCPU()
    let t0 = now()
    sleepSeconds(2)
    let t1 = now()
    let c1 = threadCPUSeconds(statFD: statFD)
    let p1 = processCPU()
    let s1 = loop.statistics
    let window = t1 - t0
    let loopCPU = (c1 - c0) / window
    let turns = Double(s1.enters - s0.enters) / window
    let f: [String: Double] = [
        "nofileLimit": Double(limit), "accepted": Double(st.accepted.load(ordering: .relaxed)), "openFDs": Double(fds),
        "loopThreadCPUFraction": loopCPU, "processCPUFraction": (p1 - p0) / window, "loopEntersPerSecond": turns,
        "loopCompletionsPerSecond": Double(s1.completions - s0.completions) / window,
    ]
    let failure = st.failure.withLock { $0 }
    rep.emit(
        failure.map { "accept sequence threw: \($0)" } ?? "measured",
        "RLIMIT_NOFILE \(limit), client \(connected.dropFirst(10)) of 400 connected, \(st.accepted.load(ordering: .relaxed)) accepted, \(fds) fds open; over 2 s: loop thread CPU \(Int((loopCPU * 100).rounded())) %, process CPU \(Int(((p1 - p0) / window * 100).rounded())) %, \(Int(turns / 1000)) K loop enters/s",
        f, final: true)
    close(hold.write)
}

// MARK: - 8. accept-flood

func probeAcceptFlood(_ target: String, _ rep: ProbeReporter) throws {
    let limit = setNoFile(20_000)
    let loop = try probeLoop(target)
    guard let fdDir = opendir("/proc/self/fd") else { throw BenchFailure("opendir: errno \(errno)") }
    let listener = try manyListener("tcp")
    let st = AcceptState()
    let lfd = listener.fd
    Task {
        var it = loop.connections(accepting: FileDescriptor(rawValue: lfd)).makeAsyncIterator()
        do {
            if try await it.next() != nil { st.accepted.add(1, ordering: .relaxed) }
        } catch {
            st.failure.withLock { $0 = "\(error)" }
        }
        // Consume no more, and keep the iterator (accepting goes on while it lives).
        while !st.stop.load(ordering: .relaxed) { try? await Task.sleep(for: .milliseconds(50)) }
        withExtendedLifetime(it) {}
    }
    usleep(100_000)
    let baseline = openFDCount(fdDir)
    let report = try cloexecPipe()
    let hold = try cloexecPipe()
    let t0 = now()
    _ = try spawnHelper(["connect", listener.args[1], "5000"], stdinFD: hold.read, stdoutFD: report.write)
    close(report.write)
    close(hold.read)
    var samples: [String] = []
    for k in 1...3 {
        sleepUntil(t0 + Double(k))
        samples.append("\(openFDCount(fdDir))")
    }
    let fds = openFDCount(fdDir)
    let connected = readLine(from: report.read, prefix: "connected ", timeout: 3).map { String($0.dropFirst(10)) } ?? "?"
    let f: [String: Double] = [
        "nofileLimit": Double(limit), "openFDsAfter3s": Double(fds), "baselineFDs": Double(baseline),
        "taken": Double(st.accepted.load(ordering: .relaxed)), "clientConnected": Double(connected) ?? -1,
    ]
    let failure = st.failure.withLock { $0 }
    rep.emit(
        failure.map { "accept sequence threw: \($0)" } ?? "measured",
        "consumer took \(st.accepted.load(ordering: .relaxed)) connection; client connected \(connected) of 5000: \(fds) open fds 3 s after the flood began (baseline \(baseline); at 1/2/3 s: \(samples.joined(separator: "/")))",
        f, final: true)
    st.stop.store(true, ordering: .relaxed)
    close(hold.write)
}

// MARK: - 9. deadlines

final class BusyState: Sendable {
    let frames = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    let armed = Atomic<Int>(0)
    let failure = Mutex<String?>(nil)
}

func probeDeadlines(_ target: String, _ rep: ProbeReporter) throws {
    let idleCount = 9000
    let limit = setNoFile(20_000)
    let loop = try probeLoop(target)
    let (a, b) = try probeSocketPair()
    let st = BusyState()
    Task(executorPreference: loop) {
        do {
            let reader = try AsyncExactReader(FileDescriptor(rawValue: a), loop: loop)
            var local = 0
            while let f = try await reader.readFrame() {
                if f.count != 64 { throw BenchFailure("frame of \(f.count) bytes") }
                local &+= 1
                if local & 1023 == 0 {
                    st.frames.add(1024, ordering: .relaxed)
                    if st.stop.load(ordering: .relaxed) { return }
                }
            }
        } catch {
            st.failure.withLock { $0 = "\(error)" }
        }
    }
    _ = try spawn(selfPath, ["--writer", "unix", "64", String(1 << 40)], passFD: b, stdoutFD: 2)
    close(b)
    let waitStart = now()
    while st.frames.load(ordering: .relaxed) == 0 && now() - waitStart < 5 { usleep(1000) }

    func window(_ seconds: Double) -> (framesPerSecond: Double, microsPerTurn: Double, entersPerSecond: Double) {
        let f0 = st.frames.load(ordering: .relaxed)
        let e0 = loop.statistics.enters
        let t0 = now()
        sleepSeconds(seconds)
        let t1 = now()
        let f1 = st.frames.load(ordering: .relaxed)
        let e1 = loop.statistics.enters
        let turns = max(1, e1 - e0)
        return (Double(f1 - f0) / (t1 - t0), (t1 - t0) * 1e6 / Double(turns), Double(e1 - e0) / (t1 - t0))
    }
    sleepSeconds(0.5)
    let before = window(3)
    rep.emit(
        "running", "0 idle: \(fmt(before.framesPerSecond / 1e6, 2)) M frames/s, \(fmt(before.microsPerTurn, 1)) µs/turn",
        ["framesPerSecondIdle0": before.framesPerSecond, "microsPerTurnIdle0": before.microsPerTurn])

    // 9,000 idle readers, each awaiting readFrame with a 60 s deadline. They share one silent
    // socket (each reader holds the loop's own duplicate of it): 9,000 socketpairs and the
    // loop's 9,000 duplicates would not fit the hard descriptor limit (20,000 here).
    var peers: [Int32] = []
    let (r, w) = try probeSocketPair()
    peers.append(w)
    for _ in 0..<idleCount {
        Task(executorPreference: loop) {
            do {
                let reader = try AsyncExactReader(FileDescriptor(rawValue: r), loop: loop, options: .init(readTimeout: .seconds(60)))
                st.armed.add(1, ordering: .relaxed)
                _ = try await reader.readFrame()
            } catch {
                if !st.stop.load(ordering: .relaxed) { st.failure.withLock { $0 = $0 ?? "idle reader: \(error)" } }
            }
        }
    }
    let armStart = now()
    while st.armed.load(ordering: .relaxed) < idleCount && now() - armStart < 10 { usleep(1000) }
    sleepSeconds(0.5)
    let after = window(3)
    st.stop.store(true, ordering: .relaxed)
    let f: [String: Double] = [
        "framesPerSecondIdle0": before.framesPerSecond, "microsPerTurnIdle0": before.microsPerTurn,
        "entersPerSecondIdle0": before.entersPerSecond,
        "framesPerSecondIdle9000": after.framesPerSecond, "microsPerTurnIdle9000": after.microsPerTurn,
        "entersPerSecondIdle9000": after.entersPerSecond, "idleArmed": Double(st.armed.load(ordering: .relaxed)),
        "nofileLimit": Double(limit),
    ]
    let failure = st.failure.withLock { $0 }
    rep.emit(
        failure.map { "failed: \($0)" } ?? "measured",
        "busy reader on the loop's executor, 64 B frames: 0 idle \(fmt(before.framesPerSecond / 1e6, 2)) M frames/s, \(fmt(before.microsPerTurn, 1)) µs/turn; \(st.armed.load(ordering: .relaxed)) idle with readTimeout 60 s: \(fmt(after.framesPerSecond / 1e6, 2)) M frames/s, \(fmt(after.microsPerTurn, 1)) µs/turn (\(fmt(before.framesPerSecond / max(after.framesPerSecond, 1), 1))× slower)",
        f, final: true)
    withExtendedLifetime(peers) {}
    Glibc.exit(0)  // without waiting for 9,000 readers to wind down
}

// MARK: - 10. fd-reuse

final class ReuseState: Sendable {
    let received = Atomic<Bool>(false)
    let failure = Mutex<String?>(nil)
    let newFD = Atomic<Int32>(-1)
}

/// Holds the old reader so that the probe says exactly when it is dropped.
final class ReaderHolder {
    var reader: AsyncExactReader?
    init(_ r: AsyncExactReader) { reader = r }
}

func probeFDReuse(_ target: String, _ rep: ProbeReporter) throws {
    let loop = try probeLoop(target)
    let st = ReuseState()
    let steps = try blockingAwait { () async throws -> String in
        let (a, peerA) = try probeSocketPair()
        let holder = ReaderHolder(
            try AsyncExactReader(FileDescriptor(rawValue: a), loop: loop, options: .init(readTimeout: .milliseconds(100))))
        // The old reader starts reading: nothing comes, the read times out, its receive stays armed.
        do { _ = try await holder.reader!.readFrame() } catch let e as Errno where e == .timedOut {}
        // Its descriptor is closed while it lives; a new connection gets the same number.
        close(a)
        close(peerA)
        var (n, peerN) = try probeSocketPair()
        if peerN == a { swap(&n, &peerN) }  // a socketpair is symmetric: read the end that has the number
        var fd = n
        if n != a {
            guard dup2(n, a) == a else { throw BenchFailure("dup2: errno \(errno)") }
            _ = fcntl(a, F_SETFD, FD_CLOEXEC)
            close(n)
            fd = a
        }
        st.newFD.store(fd, ordering: .relaxed)
        let newFD = fd
        // The new connection's reader starts reading.
        Task {
            do {
                let reader = try AsyncExactReader(FileDescriptor(rawValue: newFD), loop: loop)
                if try await reader.readFrame() != nil { st.received.store(true, ordering: .relaxed) }
            } catch {
                st.failure.withLock { $0 = "\(error)" }
            }
        }
        try await Task.sleep(for: .milliseconds(200))
        // The old reader goes.
        holder.reader = nil
        try await Task.sleep(for: .milliseconds(200))
        try Marks.frame(16).withUnsafeBytes { try writeAll(peerN, $0.baseAddress!, $0.count) }
        let end = now() + 3
        while !st.received.load(ordering: .relaxed) && st.failure.withLock({ $0 }) == nil && now() < end {
            try await Task.sleep(for: .milliseconds(5))
        }
        return "old fd \(a), new fd \(newFD) (\(n == a ? "reused by itself" : "placed with dup2"))"
    }
    let received = st.received.load(ordering: .relaxed)
    let failure = st.failure.withLock { $0 }
    rep.emit(
        received ? "received" : failure.map { "not received: reader threw \($0)" } ?? "not received (nothing in 3 s)",
        "\(steps); old reader dropped after the new one started reading, then one frame sent [loop \(loop.backend)]",
        ["received": received ? 1 : 0], final: true)
}

// MARK: - Helper processes

/// `--probe-helper KIND ARGS…`: the probes' peers.
func runProbeHelperMode(_ args: [String]) -> Never {
    signal(SIGPIPE, SIG_IGN)
    guard let kind = args.first else { Glibc.exit(2) }
    let a = Array(args.dropFirst())
    do {
        switch kind {
        case "trickle": try helperTrickle(a)
        case "split-frames": try helperSplitFrames(a)
        case "trickle-many": try helperTrickleMany(a)
        case "drain-after": helperDrainAfter(a)
        case "write-after": try helperWriteAfter(a)
        case "connect": try helperConnect(a)
        default:
            log("probe helper: unknown kind \(kind)")
            Glibc.exit(2)
        }
    } catch {
        log("probe helper \(kind): \(error)")
        Glibc.exit(1)
    }
    Glibc.exit(0)
}

/// trickle BYTE COUNT INTERVAL_US FINAL START: COUNT copies of BYTE on descriptor 3, one per
/// write, byte k at START + k × INTERVAL (absolute, CLOCK_MONOTONIC), then FINAL (if ≥ 0), then
/// closes.
func helperTrickle(_ a: [String]) throws {
    guard a.count >= 5, let byte = UInt8(a[0]), let count = Int(a[1]), let us = Int(a[2]), let final = Int(a[3]),
          let start = Double(a[4])
    else { throw BenchFailure("trickle BYTE COUNT INTERVAL_US FINAL START") }
    let interval = Double(us) / 1e6
    var b = byte
    for k in 0..<count {
        sleepUntil(start + Double(k) * interval)
        try writeAll(3, &b, 1)
    }
    if final >= 0 {
        sleepUntil(start + Double(count) * interval)
        var f = UInt8(final)
        try writeAll(3, &f, 1)
    }
    close(3)
}

/// split-frames FRAME_BYTES RATE SECONDS START: frames (4-byte prefix) on descriptor 3, each
/// send the rest of frame k and the first byte of frame k+1, RATE sends a second (spinning on
/// the clock), for SECONDS.
func helperSplitFrames(_ a: [String]) throws {
    guard a.count >= 4, let n = Int(a[0]), let rate = Double(a[1]), let seconds = Double(a[2]), let start = Double(a[3])
    else { throw BenchFailure("split-frames FRAME_BYTES RATE SECONDS START") }
    let frame = Marks.frame(n - 4)
    let send = Array(frame[1...]) + [frame[0]]
    sleepUntil(start)
    try frame.withUnsafeBytes { try writeAll(3, $0.baseAddress!, 1) }
    let end = start + seconds
    var k = 0
    try send.withUnsafeBytes { p in
        while true {
            let due = start + Double(k) / rate
            if due >= end { break }
            while now() < due {}
            try writeAll(3, p.baseAddress!, p.count)
            k += 1
        }
    }
    close(3)
}

/// trickle-many N SECONDS START BODY RATE: descriptors 3 … 3+N-1 (set non-blocking), frames of
/// BODY bytes (4-byte prefix), one byte per write, round robin, RATE writes a second in all
/// (spinning on the clock; 0: as fast as they go), until START + SECONDS; the running
/// count of bytes sent is kept at offset 0 of descriptor 3+N (a file the reader reads); then
/// prints "sent TOTAL" and waits for stdin to close (the connections stay open).
func helperTrickleMany(_ a: [String]) throws {
    guard a.count >= 5, let n = Int(a[0]), let seconds = Double(a[1]), let start = Double(a[2]), let body = Int(a[3]),
          let rate = Double(a[4])
    else { throw BenchFailure("trickle-many N SECONDS START BODY RATE") }
    let fds = (0..<Int32(n)).map { 3 + $0 }
    for fd in fds { setNonBlocking(fd) }
    let frame = Marks.frame(body)
    var pos = Array(repeating: 0, count: n)
    var sent = 0
    sleepUntil(start)
    let end = start + seconds
    var pfds = fds.map { pollfd(fd: $0, events: Int16(POLLOUT), revents: 0) }
    let countFD = 3 + Int32(n)  // the running count, for the reader's figures
    var round = 0
    while true {
        _ = pwrite(countFD, &sent, MemoryLayout<Int>.size, 0)
        if round & 15 == 0 && now() >= end { break }
        round += 1
        var progress = false
        for i in 0..<n {
            if rate > 0 {
                let due = start + Double(sent) / rate
                while now() < due {}
            }
            var byte = frame[pos[i]]
            let w = write(fds[i], &byte, 1)
            if w == 1 {
                sent += 1
                pos[i] = (pos[i] + 1) % frame.count
                progress = true
            } else if w < 0 && errno != EAGAIN && errno != EINTR {
                throw BenchFailure("write: errno \(errno)")
            }
        }
        if !progress { _ = poll(&pfds, nfds_t(pfds.count), 10) }
    }
    let line = "sent \(sent)\n"
    _ = line.withCString { write(1, $0, strlen($0)) }
    var b: UInt8 = 0
    while read(0, &b, 1) > 0 {}
}

/// drain-after AT: from AT (CLOCK_MONOTONIC seconds) on, reads descriptor 3 to its end.
func helperDrainAfter(_ a: [String]) {
    if let at = a.first.flatMap(Double.init) { sleepUntil(at) }
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = read(3, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
    }
}

/// write-after AT BYTES: at AT, writes BYTES bytes on descriptor 3, then waits for its end.
func helperWriteAfter(_ a: [String]) throws {
    guard a.count >= 2, let at = Double(a[0]), let n = Int(a[1]) else { throw BenchFailure("write-after AT BYTES") }
    let data = [UInt8](repeating: 0x44, count: n)
    sleepUntil(at)
    try data.withUnsafeBytes { try writeAll(3, $0.baseAddress!, $0.count) }
    var b: UInt8 = 0
    while read(3, &b, 1) > 0 {}
}

/// connect PORT N: N non-blocking TCP connections to 127.0.0.1:PORT; prints "issued N", waits
/// up to 3 s for them to complete, prints "connected M", then keeps them open until stdin
/// closes.
func helperConnect(_ a: [String]) throws {
    guard a.count >= 2, let port = UInt16(a[0]), let n = Int(a[1]) else { throw BenchFailure("connect PORT N") }
    setNoFile(n + 64)
    var fds: [Int32] = []
    for _ in 0..<n {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        if fd < 0 { break }
        var addr = loopbackAddress(port: port)
        let rc = withSockaddr(&addr) { connect(fd, $0, $1) }
        if rc != 0 && errno != EINPROGRESS {
            close(fd)
            break
        }
        fds.append(fd)
    }
    func say(_ s: String) { _ = (s + "\n").withCString { write(1, $0, strlen($0)) } }
    say("issued \(fds.count)")
    var done = Array(repeating: false, count: fds.count)
    var index: [Int32: Int] = [:]
    for (i, fd) in fds.enumerated() { index[fd] = i }
    var connected = 0
    let end = now() + 3
    while now() < end && done.contains(false) {
        var pfds = fds.enumerated().filter { !done[$0.offset] }.map { pollfd(fd: $0.element, events: Int16(POLLOUT), revents: 0) }
        guard poll(&pfds, nfds_t(pfds.count), 100) > 0 else { continue }
        for p in pfds where p.revents != 0 {
            guard let i = index[p.fd] else { continue }
            done[i] = true
            var e: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &e, &len)
            if e == 0 { connected += 1 }
        }
    }
    say("connected \(connected)")
    var b: UInt8 = 0
    while read(0, &b, 1) > 0 {}
}
