#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Monotonic seconds.
func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// This process's user and system CPU seconds.
func cpuTimes() -> (user: Double, sys: Double) {
    var ru = rusage()
    getrusage(RUSAGE_SELF.rawValue, &ru)
    return (Double(ru.ru_utime.tv_sec) + Double(ru.ru_utime.tv_usec) / 1e6,
            Double(ru.ru_stime.tv_sec) + Double(ru.ru_stime.tv_usec) / 1e6)
}

/// A field of /proc/self/status in bytes (VmRSS, VmHWM).
func procStatusBytes(_ key: String) -> Int {
    let fd = open("/proc/self/status", O_RDONLY)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 8192)
    let n = read(fd, &buf, buf.count)
    guard n > 0 else { return -1 }
    let text = String(decoding: buf[0..<n], as: UTF8.self)
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        let parts = line.split(separator: " ", omittingEmptySubsequences: true)
        if parts.count >= 2, let kb = Int(parts[1]) { return kb * 1024 }
    }
    return -1
}

/// Resets VmHWM to the current RSS, so the peak measured afterwards is the case's own.
func resetPeak() {
    let fd = open("/proc/self/clear_refs", O_WRONLY)
    guard fd >= 0 else { return }
    _ = write(fd, "5", 1)
    close(fd)
}

/// Blocks until `fd` is readable (or at end of stream, or in error): the moment a reader's
/// clock starts.
func waitReadable(_ fd: Int32) {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    while poll(&p, 1, -1) < 0 && errno == EINTR {}
}

/// What a child reports for its case.
struct CaseResult: Codable {
    var strategy: String
    var transport: String
    var frameBytes: Int
    var frames: Int
    var seconds: Double
    var gbPerSecond: Double
    var framesPerSecond: Double
    var peakRSSBytes: Int
    var baselineRSSBytes: Int
    var peakOverFrame: Double
    var cpuUserSeconds: Double
    var cpuSystemSeconds: Double
    var note: String?
    /// Runs of this case (median by GB/s reported); the range of GB/s across them.
    var runs: Int? = nil
    var gbPerSecondMin: Double? = nil
    var gbPerSecondMax: Double? = nil
    /// Connections read at once (1 for single-stream cases).
    var connections: Int = 1
    /// Many-connection cases: (peak − baseline) / connections, and syscalls per frame.
    var rssPerConnection: Double? = nil
    var syscallsPerFrame: Double? = nil
    /// The idle-memory case.
    var idle: Bool? = nil
    /// GB/s as a multiple of `posix-into` (the floor) and of `c-readahead` (the C ceiling) of
    /// the same transport and frame size in the same run. Many-connection cases have no floor;
    /// their ceiling is the best one-thread C row (`ceilingStrategy`: c-uring-recv, c-epoll or
    /// c-uring-mshot) of the same transport, frame size and connections.
    var floorRatio: Double? = nil
    var ceilingRatio: Double? = nil
    /// A many-connection case (also with one connection).
    var many: Bool? = nil
    /// Many-connection cases: the reader's user+sys CPU seconds per GiB of frame bodies, and as
    /// a multiple of the ceiling row's.
    var cpuSecondsPerGiB: Double? = nil
    var cpuCeilingRatio: Double? = nil
    var ceilingStrategy: String? = nil
    /// Serving cases (bench/Serve.swift): "reply" or "relay"; the strategy's user-space copies
    /// (ExactIO's statistics) and the bytes it sent zero-copy.
    var serve: String? = nil
    var bytesCopied: Int? = nil
    var bytesSentZeroCopy: Int? = nil

    enum CodingKeys: String, CodingKey {
        case strategy, transport, frameBytes, frames, seconds, gbPerSecond, framesPerSecond, peakRSSBytes,
            baselineRSSBytes, peakOverFrame, cpuUserSeconds, cpuSystemSeconds, note, runs, gbPerSecondMin,
            gbPerSecondMax, connections, rssPerConnection, syscallsPerFrame, idle, floorRatio, ceilingRatio,
            many, cpuSecondsPerGiB, cpuCeilingRatio, ceilingStrategy, serve, bytesCopied, bytesSentZeroCopy
    }

    init(
        strategy: String, transport: String, frameBytes: Int, frames: Int, seconds: Double, gbPerSecond: Double,
        framesPerSecond: Double, peakRSSBytes: Int, baselineRSSBytes: Int, peakOverFrame: Double,
        cpuUserSeconds: Double, cpuSystemSeconds: Double, note: String?
    ) {
        self.strategy = strategy
        self.transport = transport
        self.frameBytes = frameBytes
        self.frames = frames
        self.seconds = seconds
        self.gbPerSecond = gbPerSecond
        self.framesPerSecond = framesPerSecond
        self.peakRSSBytes = peakRSSBytes
        self.baselineRSSBytes = baselineRSSBytes
        self.peakOverFrame = peakOverFrame
        self.cpuUserSeconds = cpuUserSeconds
        self.cpuSystemSeconds = cpuSystemSeconds
        self.note = note
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        strategy = try c.decode(String.self, forKey: .strategy)
        transport = try c.decode(String.self, forKey: .transport)
        frameBytes = try c.decode(Int.self, forKey: .frameBytes)
        frames = try c.decode(Int.self, forKey: .frames)
        seconds = try c.decode(Double.self, forKey: .seconds)
        gbPerSecond = try c.decode(Double.self, forKey: .gbPerSecond)
        framesPerSecond = try c.decode(Double.self, forKey: .framesPerSecond)
        peakRSSBytes = try c.decode(Int.self, forKey: .peakRSSBytes)
        baselineRSSBytes = try c.decode(Int.self, forKey: .baselineRSSBytes)
        peakOverFrame = try c.decode(Double.self, forKey: .peakOverFrame)
        cpuUserSeconds = try c.decode(Double.self, forKey: .cpuUserSeconds)
        cpuSystemSeconds = try c.decode(Double.self, forKey: .cpuSystemSeconds)
        note = try c.decodeIfPresent(String.self, forKey: .note)
        runs = try c.decodeIfPresent(Int.self, forKey: .runs)
        gbPerSecondMin = try c.decodeIfPresent(Double.self, forKey: .gbPerSecondMin)
        gbPerSecondMax = try c.decodeIfPresent(Double.self, forKey: .gbPerSecondMax)
        connections = try c.decodeIfPresent(Int.self, forKey: .connections) ?? 1
        rssPerConnection = try c.decodeIfPresent(Double.self, forKey: .rssPerConnection)
        syscallsPerFrame = try c.decodeIfPresent(Double.self, forKey: .syscallsPerFrame)
        idle = try c.decodeIfPresent(Bool.self, forKey: .idle)
        floorRatio = try c.decodeIfPresent(Double.self, forKey: .floorRatio)
        ceilingRatio = try c.decodeIfPresent(Double.self, forKey: .ceilingRatio)
        many = try c.decodeIfPresent(Bool.self, forKey: .many)
        cpuSecondsPerGiB = try c.decodeIfPresent(Double.self, forKey: .cpuSecondsPerGiB)
        cpuCeilingRatio = try c.decodeIfPresent(Double.self, forKey: .cpuCeilingRatio)
        ceilingStrategy = try c.decodeIfPresent(String.self, forKey: .ceilingStrategy)
        serve = try c.decodeIfPresent(String.self, forKey: .serve)
        bytesCopied = try c.decodeIfPresent(Int.self, forKey: .bytesCopied)
        bytesSentZeroCopy = try c.decodeIfPresent(Int.self, forKey: .bytesSentZeroCopy)
    }
}

struct BenchFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Runs `body` (which reads every frame) between the baseline and the peak measurements.
/// The baseline is taken after the connection exists and before the strategy allocates anything.
///
/// `setup` runs after the baseline and before the clock starts: what it allocates counts in the
/// peak, not in the time (posix-into's pre-faulted buffer, a reader's creation). The clock
/// starts when the first byte is readable on `fd`, so the writer's start-up is never in a
/// reader's time.
func measure<State>(_ c: BenchCase, fd: Int32, setup: () throws -> State, _ body: (State) throws -> Int) throws -> CaseResult {
    resetPeak()
    let baseline = procStatusBytes("VmRSS")
    let state = try setup()
    waitReadable(fd)
    let cpu0 = cpuTimes()
    let t0 = now()
    let frames = try body(state)
    let seconds = now() - t0
    let cpu1 = cpuTimes()
    let peak = procStatusBytes("VmHWM")
    guard frames == c.frames else { throw BenchFailure("read \(frames) frames, expected \(c.frames)") }
    let bytes = Double(c.frames) * Double(c.frameBytes)
    return CaseResult(
        strategy: c.strategy, transport: c.transport, frameBytes: c.frameBytes, frames: c.frames,
        seconds: seconds, gbPerSecond: bytes / seconds / 1e9, framesPerSecond: Double(c.frames) / seconds,
        peakRSSBytes: peak, baselineRSSBytes: baseline,
        peakOverFrame: Double(peak - baseline) / Double(c.frameBytes),
        cpuUserSeconds: cpu1.user - cpu0.user, cpuSystemSeconds: cpu1.sys - cpu0.sys, note: nil)
}
