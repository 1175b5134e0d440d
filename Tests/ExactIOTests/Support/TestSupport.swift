import ExactIOCTestSupport
import Foundation
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

/// Transports every reader test runs over.
enum Transport: String, CaseIterable, Sendable, CustomStringConvertible {
    case pipe, unix, tcp, file
    var description: String { rawValue }
}

/// True when this machine lets us create an io_uring (not in Docker's default seccomp
/// profile, not with kernel.io_uring_disabled).
let uringAvailable: Bool = {
    guard let p = try? FileDescriptor.pipe() else { return false }
    defer {
        try? p.readEnd.close()
        try? p.writeEnd.close()
    }
    return (try? ExactReader(p.readEnd, options: .init(backend: .ioUring))) != nil
}()

/// CI sets EXACTIO_REQUIRE_URING=1: there, io_uring being unavailable is a failure, not a skip.
let uringRequired = ProcessInfo.processInfo.environment["EXACTIO_REQUIRE_URING"] == "1"

/// The backends to test on this machine.
let testBackends: [ExactReader.Backend] = uringAvailable ? [.posix, .ioUring] : [.posix]

func options(_ backend: ExactReader.Backend, staging: Int = 64 << 10, maxFrame: Int = 64 << 20) -> ExactReader.Options {
    .init(backend: backend, stagingCapacity: staging, maxFrameLength: maxFrame)
}

/// Deterministic bytes: a cheap pattern that differs per position and seed.
func pattern(_ count: Int, seed: UInt64 = 1) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    for i in 0..<count {
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        out[i] = UInt8(truncatingIfNeeded: x)
    }
    return out
}

func frame(_ body: [UInt8]) -> [UInt8] {
    let n = UInt32(body.count)
    return [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)] + body
}

/// Writes all of `bytes`, retrying short writes and EINTR; waits on EAGAIN.
func writeAll(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer) throws {
    var off = 0
    while off < bytes.count {
        do {
            off += try fd.write(UnsafeRawBufferPointer(rebasing: bytes[off...]))
        } catch Errno.resourceTemporarilyUnavailable {
            var pfd = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
            _ = poll(&pfd, 1, 100)
        }
    }
}

/// A connected pair of descriptors: the reader's end and the writer's end.
struct Channel {
    let read: FileDescriptor
    let write: FileDescriptor?  // nil for a file (already written)
    let path: String?

    /// Closes the read end. The write end belongs to the writer thread, which closes it
    /// (closing it twice could close a descriptor number another test has reused).
    func close() {
        try? read.close()
        if let path { unlink(path) }
    }
}

func socketPair(_ domain: Int32) throws -> (FileDescriptor, FileDescriptor) {
    var fds: [Int32] = [0, 0]
    guard socketpair(domain, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw Errno(rawValue: errno) }
    return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
}

/// A TCP connection over loopback: (accepted server side, client side).
func tcpPair() throws -> (FileDescriptor, FileDescriptor) {
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard listener >= 0 else { throw Errno(rawValue: errno) }
    defer { Glibc.close(listener) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    try withUnsafeMutablePointer(to: &addr) { p in
        try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            guard bind(listener, sa, len) == 0, listen(listener, 1) == 0, getsockname(listener, sa, &len) == 0
            else { throw Errno(rawValue: errno) }
        }
    }
    let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard client >= 0 else { throw Errno(rawValue: errno) }
    try withUnsafePointer(to: &addr) { p in
        try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            guard connect(client, sa, len) == 0 else { throw Errno(rawValue: errno) }
        }
    }
    let server = accept(listener, nil, nil)
    guard server >= 0 else { throw Errno(rawValue: errno) }
    return (FileDescriptor(rawValue: server), FileDescriptor(rawValue: client))
}

func tempFile(containing bytes: [UInt8]) throws -> (FileDescriptor, String) {
    var template = Array("/tmp/exactio-test-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    guard fd >= 0 else { throw Errno(rawValue: errno) }
    let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let w = FileDescriptor(rawValue: fd)
    try bytes.withUnsafeBytes { try writeAll(w, $0) }
    _ = try w.seek(offset: 0, from: .start)
    return (w, path)
}

/// Opens a channel of `transport`; for `.file`, the file already holds `fileBytes`.
func openChannel(_ transport: Transport, fileBytes: [UInt8] = []) throws -> Channel {
    switch transport {
    case .pipe:
        let p = try FileDescriptor.pipe()
        return Channel(read: p.readEnd, write: p.writeEnd, path: nil)
    case .unix:
        let (a, b) = try socketPair(AF_UNIX)
        return Channel(read: a, write: b, path: nil)
    case .tcp:
        let (a, b) = try tcpPair()
        return Channel(read: a, write: b, path: nil)
    case .file:
        let (fd, path) = try tempFile(containing: fileBytes)
        return Channel(read: fd, write: nil, path: path)
    }
}

/// Runs `write` on a background thread; `join()` (blocking) or `await finished()` waits for it.
///
/// Both wait at most `writerPatience`: a writer still blocked after that means the reader stopped
/// reading (a failure elsewhere, or a hang). That is recorded as a test failure and the wait
/// returns (the thread is left behind), so a failing test fails instead of hanging the suite.
final class Writer: @unchecked Sendable {
    // @unchecked Sendable: `state` is guarded by `lock`; `error` is written before `finish`.
    private let lock = NSLock()
    private var finishedFlag = false
    private var waiters: [Int: CheckedContinuation<Bool, Never>] = [:]
    private var nextWaiter = 0
    private let done = DispatchSemaphore(value: 0)
    private(set) var error: Error?

    init(_ body: @escaping @Sendable () throws -> Void) {
        Thread.detachNewThread { [self] in
            do { try body() } catch { self.error = error }
            finish()
        }
    }

    private func finish() {
        lock.lock()
        finishedFlag = true
        let ws = waiters.values
        waiters = [:]
        lock.unlock()
        done.signal()
        for w in ws { w.resume(returning: true) }
    }

    func join(sourceLocation: SourceLocation = #_sourceLocation) {
        if done.wait(timeout: .now() + writerPatience) == .timedOut {
            Issue.record("writer thread still blocked after \(writerPatience) s: the reader stopped reading", sourceLocation: sourceLocation)
            return
        }
        done.signal()  // join() may be called again
    }

    /// The async wait: no cooperative thread is blocked meanwhile.
    func finished(sourceLocation: SourceLocation = #_sourceLocation) async {
        let ended = await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            lock.lock()
            if finishedFlag {
                lock.unlock()
                c.resume(returning: true)
                return
            }
            nextWaiter += 1
            let id = nextWaiter
            waiters[id] = c
            lock.unlock()
            DispatchQueue.global().asyncAfter(deadline: .now() + writerPatience) { [self] in
                lock.lock()
                let w = waiters.removeValue(forKey: id)
                lock.unlock()
                w?.resume(returning: false)
            }
        }
        if !ended {
            Issue.record("writer thread still blocked after \(writerPatience) s: the reader stopped reading", sourceLocation: sourceLocation)
        }
    }
}

/// How long a test waits for a writer thread before calling it stuck (seconds).
let writerPatience: Double = 120

/// Feeds `bytes` into `channel` in chunks of the given sizes (cycled), then closes the write
/// end. For files, the bytes were written at creation and this does nothing.
func feed(_ channel: Channel, _ bytes: [UInt8], chunks: [Int] = [1 << 20]) -> Writer {
    let fd = channel.write
    return Writer {
        guard let fd else { return }
        defer { try? fd.close() }
        var off = 0
        var i = 0
        try bytes.withUnsafeBytes { raw in
            while off < raw.count {
                let n = min(max(1, chunks[i % chunks.count]), raw.count - off)
                try writeAll(fd, UnsafeRawBufferPointer(rebasing: raw[off..<(off + n)]))
                off += n
                i += 1
            }
        }
    }
}

/// Opens `transport` carrying `bytes`, returns the reader's descriptor and the writer.
func stream(_ transport: Transport, _ bytes: [UInt8], chunks: [Int] = [1 << 20]) throws -> (Channel, Writer) {
    let ch = try openChannel(transport, fileBytes: transport == .file ? bytes : [])
    let writer = feed(ch, bytes, chunks: chunks)
    return (ch, writer)
}

/// Current VmRSS / VmHWM of this process, in bytes.
func procStatus(_ key: String) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        let digits = line.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? -1
        return digits * 1024
    }
    return -1
}

/// Resets VmHWM to the current RSS (Linux 4.0+).
func resetPeakRSS() {
    let fd = open("/proc/self/clear_refs", O_WRONLY)
    guard fd >= 0 else { return }
    _ = write(fd, "5", 1)
    Glibc.close(fd)
}

/// Open descriptors of this process.
func openDescriptorCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

/// This process's open sockets whose local address has `port` (a listener and the connections
/// it accepted): each descriptor asked with `IOLoop.localPort(of:)` (getsockname(2)). (Reading
/// the kernel's socket tables in /proc/net/tcp instead missed sockets while other processes'
/// connections came and went: CI runs saw 0 where the listener was open.)
func openSocketsOnLocalPort(_ port: UInt16) -> Int {
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    // Not a socket, not IPv4/IPv6, or closed since the listing: `localPort` throws.
    return fds.compactMap { Int32($0) }.filter { (try? IOLoop.localPort(of: FileDescriptor(rawValue: $0))) == port }.count
}

/// Open descriptors of this process and what they are.
func openDescriptorList() -> String {
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return fds.sorted().map { "\($0)=\((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0)) ?? "?")" }
        .joined(separator: " ")
}

/// Lines in /proc/self/maps: the process's mappings.
func mappingCount() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8) else { return -1 }
    return text.split(separator: "\n").count
}

/// Writes `message` to stderr (what an exit test's parent prints).
/// Also appended to /tmp/exactio-test-report.log: an exit test that fails shows no output.
func report(_ message: String) {
    FileHandle.standardError.write((message + "\n").data(using: .utf8)!)
    if let log = FileHandle(forUpdatingAtPath: "/tmp/exactio-test-report.log") ?? {
        _ = FileManager.default.createFile(atPath: "/tmp/exactio-test-report.log", contents: nil)
        return FileHandle(forUpdatingAtPath: "/tmp/exactio-test-report.log")
    }() {
        log.seekToEndOfFile()
        log.write((message + "\n").data(using: .utf8)!)
        try? log.close()
    }
}

/// Prints what an exit test's child wrote to stderr.
func printChild(_ result: ExitTest.Result?) {
    if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
}

extension ExactReader.Backend {
    /// For exit tests, which capture only Codable values.
    var isURing: Bool { self == .ioUring }
    init(uring: Bool) { self = uring ? .ioUring : .posix }
}

/// Ends an unprivileged child: `_exit`, skipping LeakSanitizer's check at exit, which cannot
/// stop the threads of a process whose uid changed (its tracer is refused).
func endUnprivilegedChild() -> Never {
    _exit(0)
}

/// Drops this (child) process's privileges to a user of its own, with RLIMIT_MEMLOCK =
/// `memlock` bytes. The kernel charges io_uring memory per user, and releases it a moment
/// after rings close: a uid per process keeps concurrent and consecutive tests apart.
func becomeUnprivileged(memlock: Int) {
    var nofile = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &nofile)
    nofile.rlim_cur = nofile.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &nofile)
    var rl = rlimit(rlim_cur: rlim_t(memlock), rlim_max: rlim_t(memlock))
    guard setrlimit(Int32(__RLIMIT_MEMLOCK.rawValue), &rl) == 0 else { fatalError("setrlimit") }
    if getuid() == 0 {
        let id = UInt32(200_000 + Int(getpid()) % 100_000)
        guard setgroups(0, nil) == 0, setgid(id) == 0, setuid(id) == 0 else { fatalError("drop privileges") }
        _ = ctest_set_dumpable()
    }
}
