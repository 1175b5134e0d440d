import ExactIOBenchCeiling
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The path of this executable (children and writers are this program in another mode).
let selfPath: String = {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
}()

/// Spawns `path args`, with `passFD` (if any) as the child's descriptor 3 (or `passFDs` as
/// descriptors 3, 4, …), stdin from `stdinFD` and stdout to `stdoutFD` if given. Returns the pid.
func spawn(
    _ path: String, _ args: [String], passFD: Int32? = nil, passFDs: [Int32] = [], stdinFD: Int32? = nil,
    stdoutFD: Int32? = nil
) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if let passFD { posix_spawn_file_actions_adddup2(&actions, passFD, 3) }
    // Descriptors 3… may be taken in this process: move each out of the way first.
    let moved = passFDs.map { fcntl($0, F_DUPFD_CLOEXEC, 3 + Int32(passFDs.count)) }
    defer { for fd in moved where fd >= 0 { close(fd) } }
    for (i, fd) in moved.enumerated() { posix_spawn_file_actions_adddup2(&actions, fd, 3 + Int32(i)) }
    if let stdinFD { posix_spawn_file_actions_adddup2(&actions, stdinFD, 0) }
    if let stdoutFD { posix_spawn_file_actions_adddup2(&actions, stdoutFD, 1) }
    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, &actions, nil, argv, environ)
    guard rc == 0 else { throw BenchFailure("posix_spawn \(path): errno \(rc)") }
    return pid
}

/// Waits for `pid`; returns its exit status (or 128 + signal).
@discardableResult
func waitExit(_ pid: pid_t) -> Int32 {
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    if status & 0x7f == 0 { return (status >> 8) & 0xff }
    return 128 + (status & 0x7f)
}

func loopbackAddress(port: UInt16) -> sockaddr_in {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = port.bigEndian
    return addr
}

func withSockaddr<R>(_ addr: inout sockaddr_in, _ body: (UnsafeMutablePointer<sockaddr>, socklen_t) -> R) -> R {
    withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
}

/// Sets up the transport for a reader child: starts the writer process and returns the
/// descriptor to read from plus the writer's pid.
func openTransport(_ c: BenchCase) throws -> (fd: Int32, writer: pid_t) {
    try openTransport(c.transport, writerArgs: ["--writer", c.transport, String(c.frameBytes), String(c.frames)])
}

/// Starts this program with `writerArgs` as the writer of `transport` (descriptor 3 for unix
/// and pipe, `--port P` for tcp, `--path FILE` for file) and returns the read end.
func openTransport(_ transport: String, writerArgs: [String]) throws -> (fd: Int32, writer: pid_t) {
    switch transport {
    case "unix":
        var sv: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0
        else { throw BenchFailure("socketpair: errno \(errno)") }
        let pid = try spawn(selfPath, writerArgs, passFD: sv[1])
        close(sv[1])
        return (sv[0], pid)
    case "pipe":
        var p: [Int32] = [0, 0]
        guard pipe(&p) == 0, fcntl(p[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(p[1], F_SETFD, FD_CLOEXEC) == 0
        else { throw BenchFailure("pipe: errno \(errno)") }
        let pid = try spawn(selfPath, writerArgs, passFD: p[1])
        close(p[1])
        return (p[0], pid)
    case "tcp":
        let l = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = loopbackAddress(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withSockaddr(&addr) { sa, l2 in
            bind(l, sa, l2) == 0 && listen(l, 1) == 0 && getsockname(l, sa, &len) == 0
        }
        guard ok else { throw BenchFailure("tcp listen: errno \(errno)") }
        let port = UInt16(bigEndian: addr.sin_port)
        let pid = try spawn(selfPath, writerArgs + ["--port", String(port)])
        let fd = accept(l, nil, nil)
        close(l)
        guard fd >= 0 else { throw BenchFailure("accept: errno \(errno)") }
        return (fd, pid)
    case "tcp-to-file":
        return try openTransport("tcp", writerArgs: writerArgs)
    case "random":
        // The file the records are read from: 1 GiB of 1 MiB frames, in the page cache.
        return try openTransport("file", writerArgs: ["--writer", "file", String(1 << 20), String(randomFileBytes >> 20)])
    case "file", "direct":
        // EXACTIO_BENCH_FILE_DIR: where the file cases' file goes (default /tmp; /dev/shm takes
        // the device out of the direct cases, to see the readers' own costs).
        let dir = getenv("EXACTIO_BENCH_FILE_DIR").map { String(cString: $0) } ?? "/tmp"
        let path = "\(dir)/exactio-bench-\(getpid()).dat"
        let pid = try spawn(selfPath, writerArgs + ["--path", path])
        guard waitExit(pid) == 0 else { throw BenchFailure("file writer failed") }
        let fd = transport == "direct" ? exio_open_direct(path) : open(path, O_RDONLY | O_CLOEXEC)
        unlink(path)  // the data lives while the descriptor is open
        guard fd >= 0 else { throw BenchFailure("open \(path): errno \(errno)") }
        return (fd, 0)
    default:
        throw BenchFailure("unknown transport \(transport)")
    }
}

/// Reads `fd` to its end (a child's stdout), then closes it.
func readToEnd(closing fd: Int32) -> [UInt8] {
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        out += buf[0..<n]
    }
    close(fd)
    return out
}

func writeAll(_ fd: Int32, _ p: UnsafeRawPointer, _ count: Int) throws {
    var off = 0
    while off < count {
        let n = write(fd, p + off, count - off)
        if n < 0 {
            if errno == EINTR { continue }
            throw BenchFailure("write: errno \(errno)")
        }
        off += n
    }
}

/// The writer's end of `transport` (the other side of `openTransport`): descriptor 3 for
/// unix and pipe, a connection to `port` for tcp, a new file at `path`. Ignores SIGPIPE.
func writerDescriptor(transport: String, port: UInt16?, path: String?) throws -> Int32 {
    signal(SIGPIPE, SIG_IGN)
    switch transport {
    case "tcp", "tcp-to-file":
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = loopbackAddress(port: port ?? 0)
        guard withSockaddr(&addr, { connect(fd, $0, $1) }) == 0 else { throw BenchFailure("connect: errno \(errno)") }
        return fd
    case "file", "direct":
        let fd = open(path ?? "/tmp/exactio-bench.dat", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw BenchFailure("create file: errno \(errno)") }
        return fd
    default:
        return 3
    }
}

/// The writer process: sends `frames` frames of `n` bytes as fast as it can from
/// preallocated memory (small frames batched into 4 MiB writes; large frames as a 5-byte
/// head, 4 MiB body writes and a 1-byte tail).
func runWriter(transport: String, n: Int, frames: Int, port: UInt16?, path: String?) throws {
    let fd = try writerDescriptor(transport: transport, port: port, path: path)
    let chunkBytes = 4 << 20
    // Page-aligned sources: the kernel's copy is slowest when source and destination are a few
    // bytes apart modulo 4 KiB, and a Swift array's elements start 32 bytes into a page.
    func aligned(_ bytes: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes, 1), alignment: 4096)
    }
    if n + 4 <= chunkBytes {
        let perBatch = max(1, chunkBytes / (n + 4))
        let one = Marks.frame(n)
        let batch = aligned(perBatch * one.count)
        defer { batch.deallocate() }
        for k in 0..<perBatch {
            one.withUnsafeBytes { batch.baseAddress!.advanced(by: k * one.count).copyMemory(from: $0.baseAddress!, byteCount: one.count) }
        }
        var left = frames
        while left > 0 {
            let k = min(left, perBatch)
            try writeAll(fd, batch.baseAddress!, k * one.count)
            left -= k
        }
    } else {
        let fill = aligned(chunkBytes)
        defer { fill.deallocate() }
        memset(fill.baseAddress!, Int32(Marks.fill), chunkBytes)
        let head = Marks.header(n) + [Marks.first]
        let tail = [Marks.last]
        for _ in 0..<frames {
            try head.withUnsafeBytes { try writeAll(fd, $0.baseAddress!, $0.count) }
            var left = n - 2
            while left > 0 {
                let k = min(left, chunkBytes)
                try writeAll(fd, fill.baseAddress!, k)
                left -= k
            }
            try tail.withUnsafeBytes { try writeAll(fd, $0.baseAddress!, 1) }
        }
    }
    // O_DIRECT reads wait for dirty pages to reach the device first: flush them before any
    // reader's clock starts.
    if transport == "direct" { fsync(fd) }
    close(fd)
}
