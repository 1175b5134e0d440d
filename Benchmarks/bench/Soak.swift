import ExactIO
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

// bench --soak MINUTES: mixed frame sizes (0 B to 16 MiB) over unix and tcp on both backends
// at once, and 64 connections on an IOLoop per backend (LoopSoak.swift, reads cancelled and
// retried at random); views held for random numbers of frames, every frame verified; alongside, hostile
// peers (headers that stall, maximal lengths, resets mid-body, up to 64 stalled connections
// held open); RSS sampled every second. Fails when a frame is wrong, a hostile peer is not
// refused with the right error, or RSS keeps growing after warm-up.

/// The frame sequence of a soak stream: sizes and contents both follow from (seed, index).
struct SoakSequence {
    var state: UInt64

    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }

    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }

    /// 70 % up to 4 KiB, 25 % up to 1 MiB, 5 % up to 16 MiB.
    mutating func nextSize() -> Int {
        let r = next() % 100
        let x = Int(next() % UInt64(Int.max))
        switch r {
        case ..<70: return x % 4097
        case ..<95: return x % ((1 << 20) + 1)
        default: return x % ((16 << 20) + 1)
        }
    }

    /// Byte k of frame i.
    @inline(__always)
    static func byte(_ i: Int, _ k: Int) -> UInt8 { UInt8(truncatingIfNeeded: i &* 131 &+ k &* 7 &+ (k >> 12)) }

    /// The first byte of `frame` (frame `i` of a soak stream) that is not what was sent, if any.
    static func firstMismatch(_ frame: ByteView, frame i: Int) -> Int? {
        frame.withUnsafeBytes { b in
            for k in 0..<b.count where b[k] != byte(i, k) { return k }
            return nil
        }
    }

    /// A held view must never change: one of them is re-checked (its middle byte) every frame.
    /// Returns the frame index of a view that changed.
    static func changedHeldView(_ held: [(release: Int, view: ByteView, index: Int)]) -> Int? {
        guard let h = held.first, h.view.count > 0, h.view[h.view.count / 2] != byte(h.index, h.view.count / 2) else { return nil }
        return h.index
    }
}

/// The soak writer process: an endless stream of the sequence's frames (until killed).
func runSoakWriter(transport: String, seed: UInt64, port: UInt16?) throws -> Never {
    let fd = try writerDescriptor(transport: transport, port: port, path: nil)
    var seq = SoakSequence(seed: seed)
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: (16 << 20) + 4, alignment: 4096)
    var i = 0
    while true {
        let n = seq.nextSize()
        buf.copyBytes(from: Marks.header(n))
        for k in 0..<n { buf[4 + k] = SoakSequence.byte(i, k) }
        do { try writeAll(fd, buf.baseAddress!, n + 4) } catch { exit(0) }  // the reader went away
        i += 1
    }
}

final class SoakStream: Sendable {
    let transport: String
    let backend: ExactReader.Backend
    let seed: UInt64
    let frames = Atomic<Int>(0)
    let bytes = Atomic<Int>(0)
    let heldMax = Atomic<Int>(0)
    let failureText = Mutex<String?>(nil)

    var failure: String? {
        get { failureText.withLock { $0 } }
    }

    func fail(_ why: String) { failureText.withLock { $0 = why } }

    init(transport: String, backend: ExactReader.Backend, seed: UInt64) {
        self.transport = transport
        self.backend = backend
        self.seed = seed
    }
}

let soakStop = Atomic<Bool>(false)

func runSoak(minutes: Double, log: (String) -> Void) -> Bool {
    soakStop.store(false, ordering: .relaxed)
    var streams: [SoakStream] = []
    var writers: [pid_t] = []
    var threads: [Thread] = []
    let done = DispatchGroup()
    var seed: UInt64 = 1
    for transport in ["unix", "tcp"] {
        for backend in [ExactReader.Backend.posix, .ioUring] {
            let s = SoakStream(transport: transport, backend: backend, seed: seed)
            seed += 1
            let fd: Int32
            do {
                let (readEnd, pid) = try openTransport(transport, writerArgs: ["--soak-writer", transport, String(s.seed)])
                fd = readEnd
                writers.append(pid)
            } catch {
                log("soak: \(error)")
                return false
            }
            streams.append(s)
            done.enter()
            let t = Thread {
                soakRead(s, fd: fd)
                close(fd)
                done.leave()
            }
            t.stackSize = 1 << 20
            threads.append(t)
            t.start()
        }
    }
    // Many connections on a loop, per backend.
    let loopResults = [LoopSoakResult(backend: .ioUring), LoopSoakResult(backend: .posix)]
    for r in loopResults {
        done.enter()
        Task.detached {
            await runLoopSoak(r)
            done.leave()
        }
    }
    let hostile = HostilePeers()
    done.enter()
    let ht = Thread {
        hostile.run()
        done.leave()
    }
    ht.stackSize = 1 << 20
    ht.start()
    // Sample RSS every second.
    let start = now()
    var samples: [(Double, Int)] = []
    var lastLog = 0
    while now() - start < minutes * 60 {
        sleep(1)
        let t = now() - start
        samples.append((t, procStatusBytes("VmRSS")))
        if Int(t) / 10 > lastLog {  // every 10 s, even when a sample comes late
            lastLog = Int(t) / 10
            let total = streams.reduce(0) { $0 + $1.bytes.load(ordering: .relaxed) }
            log(String(format: "soak %4.0fs: RSS %@, %.2f GB read, %d frames", t, fmtBytes(samples.last!.1),
                       Double(total) / 1e9, streams.reduce(0) { $0 + $1.frames.load(ordering: .relaxed) }))
        }
        if streams.contains(where: { $0.failure != nil }) || hostile.failure != nil || loopResults.contains(where: { $0.failure != nil }) { break }
    }
    soakStop.store(true, ordering: .relaxed)
    for w in writers { kill(w, SIGTERM) }
    done.wait()
    for w in writers { waitExit(w) }

    // Flatness after warm-up (the first 20 % of samples, at least 5 s).
    let warm = samples.filter { $0.0 >= max(5, minutes * 60 * 0.2) }
    var slopeMiBPerMin = 0.0
    var maxRSS = samples.map(\.1).max() ?? 0
    if warm.count >= 3 {
        let n = Double(warm.count)
        let mx = warm.reduce(0) { $0 + $1.0 } / n
        let my = warm.reduce(0) { $0 + Double($1.1) } / n
        let sxy = warm.reduce(0) { $0 + ($1.0 - mx) * (Double($1.1) - my) }
        let sxx = warm.reduce(0) { $0 + ($1.0 - mx) * ($1.0 - mx) }
        slopeMiBPerMin = sxx > 0 ? sxy / sxx * 60 / Double(1 << 20) : 0
        maxRSS = warm.map(\.1).max() ?? maxRSS
    }
    let firstHalfMax = warm.prefix(warm.count / 2).map(\.1).max() ?? 0
    let secondHalfMax = warm.suffix(warm.count - warm.count / 2).map(\.1).max() ?? 0
    var ok = true
    for s in streams {
        log(String(format: "soak %@/%@: %d frames, %.2f GB, at most %d views held%@", s.transport, s.backend.description,
                   s.frames.load(ordering: .relaxed), Double(s.bytes.load(ordering: .relaxed)) / 1e9,
                   s.heldMax.load(ordering: .relaxed), s.failure.map { " — FAILED: \($0)" } ?? ""))
        if s.failure != nil || s.frames.load(ordering: .relaxed) == 0 { ok = false }
    }
    for r in loopResults {
        let stats = r.statistics.withLock { $0 }
        log(String(format: "soak loop/%@: 64 connections, %d frames, %.2f GB, %d reads cancelled and retried%@%@",
                   r.backend.description, r.frames.load(ordering: .relaxed), Double(r.bytes.load(ordering: .relaxed)) / 1e9,
                   r.cancelled.load(ordering: .relaxed), stats.map { ", \($0)" } ?? "",
                   r.failure.map { " — FAILED: \($0)" } ?? ""))
        if r.failure != nil || r.frames.load(ordering: .relaxed) == 0 { ok = false }
    }
    let h = hostile.counts.withLock { $0 }
    log("soak hostile peers: \(h.stalls) stalled headers, \(h.oversized) oversized lengths, \(h.resets) resets mid-body, "
        + "at most \(h.held) stalled connections held\(hostile.failure.map { " — FAILED: \($0)" } ?? "")")
    if hostile.failure != nil || h.stalls == 0 || h.oversized == 0 || h.resets == 0 { ok = false }
    // Flat: the second half of the run never goes above the first half's peak by more than
    // 10 % + 32 MiB (one more 16 MiB frame held per stream is within the noise).
    let flat = secondHalfMax <= Int(Double(firstHalfMax) * 1.1) + (32 << 20)
    log(String(format: "soak: %.1f min, RSS after warm-up: slope %.2f MiB/min, max %@, first-half max %@, second-half max %@ — %@",
               (now() - start) / 60, slopeMiBPerMin, fmtBytes(maxRSS), fmtBytes(firstHalfMax), fmtBytes(secondHalfMax),
               flat ? "flat" : "GROWING"))
    print(String(format: "soak: %.1f minutes, %d frames verified, RSS slope %.2f MiB/min, max RSS %@: %@",
                 (now() - start) / 60, streams.reduce(0) { $0 + $1.frames.load(ordering: .relaxed) }, slopeMiBPerMin, fmtBytes(maxRSS),
                 ok && flat ? "PASS" : "FAIL"))
    return ok && flat
}

/// One reader thread: verifies every frame in full; holds each view for 0-63 frames.
func soakRead(_ s: SoakStream, fd: Int32) {
    do {
        let reader = try ExactReader(FileDescriptor(rawValue: fd), options: .init(backend: s.backend))
        var seq = SoakSequence(seed: s.seed)
        var hold = SoakSequence(seed: s.seed ^ 0xABCDEF)
        var held: [(release: Int, view: ByteView, index: Int)] = []
        var i = 0
        while !soakStop.load(ordering: .relaxed) {
            let n = seq.nextSize()
            guard let f = try reader.readFrame() else { break }
            guard f.count == n else { s.fail("frame \(i): \(f.count) bytes, expected \(n)"); return }
            guard SoakSequence.firstMismatch(f, frame: i) == nil else { s.fail("frame \(i): content differs"); return }
            held.append((i + Int(hold.next() % 64), f, i))
            held.removeAll { $0.release <= i }
            if held.count > s.heldMax.load(ordering: .relaxed) { s.heldMax.store(held.count, ordering: .relaxed) }
            if let changed = SoakSequence.changedHeldView(held) {
                s.fail("held view of frame \(changed) changed")
                return
            }
            s.frames.add(1, ordering: .relaxed)
            s.bytes.add(n, ordering: .relaxed)
            i += 1
        }
    } catch ExactReadError.incomplete(_, _) where soakStop.load(ordering: .relaxed) {
        // the writer was stopped mid-frame
    } catch let e as Errno where soakStop.load(ordering: .relaxed) && (e == .connectionReset || e == .brokenPipe) {
    } catch {
        if !soakStop.load(ordering: .relaxed) { s.fail("\(error)") }
    }
}

/// Hostile peers, in this process, on both backends: a header announcing 64 MiB and then
/// nothing (the read times out; the connection is held open, up to 64 at a time), a length
/// over the limit, and 8 MiB announced, 64 KiB sent, then a TCP reset.
final class HostilePeers: Sendable {
    struct Counts { var stalls = 0, oversized = 0, resets = 0, held = 0 }
    let counts = Mutex(Counts())
    let failureText = Mutex<String?>(nil)
    var failure: String? { failureText.withLock { $0 } }

    func run() {
        var held: [(ExactReader, Int32, Int32)] = []
        var i = 0
        while !soakStop.load(ordering: .relaxed) && failure == nil {
            let backend: ExactReader.Backend = i % 2 == 0 ? .ioUring : .posix
            do {
                switch i % 3 {
                case 0: try stall(backend, &held)
                case 1: try oversized(backend)
                default: try reset(backend)
                }
            } catch {
                failureText.withLock { $0 = "hostile case \(i % 3) on \(backend): \(error)" }
            }
            i += 1
            usleep(20_000)
        }
        for (_, a, b) in held { close(a); close(b) }
    }

    func stall(_ backend: ExactReader.Backend, _ held: inout [(ExactReader, Int32, Int32)]) throws {
        var sv: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0 else { throw BenchFailure("socketpair") }
        let reader = try ExactReader(
            FileDescriptor(rawValue: sv[0]), options: .init(backend: backend, readTimeout: .milliseconds(50)))
        try writeAll(sv[1], Marks.header(64 << 20), 4)
        do {
            _ = try reader.readFrame()
            throw BenchFailure("a stalled header produced a frame")
        } catch let e as Errno where e == .timedOut {
        }
        held.append((reader, sv[0], sv[1]))
        if held.count > 64 {
            let (_, a, b) = held.removeFirst()
            close(a)
            close(b)
        }
        counts.withLock { c in
            c.stalls += 1
            c.held = max(c.held, held.count)
        }
    }

    func oversized(_ backend: ExactReader.Backend) throws {
        var sv: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0 else { throw BenchFailure("socketpair") }
        defer { close(sv[0]); close(sv[1]) }
        let reader = try ExactReader(FileDescriptor(rawValue: sv[0]), options: .init(backend: backend))
        try writeAll(sv[1], [0xFF, 0xFF, 0xFF, 0xFF], 4)
        do {
            _ = try reader.readFrame()
            throw BenchFailure("an oversized length produced a frame")
        } catch ExactReadError.frameTooLarge(let length, _) where length == 0xFFFF_FFFF {
        }
        counts.withLock { $0.oversized += 1 }
    }

    func reset(_ backend: ExactReader.Backend) throws {
        let l = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(l) }
        var addr = loopbackAddress(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        guard withSockaddr(&addr, { sa, l2 in bind(l, sa, l2) == 0 && listen(l, 1) == 0 && getsockname(l, sa, &len) == 0 })
        else { throw BenchFailure("listen") }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard withSockaddr(&addr, { connect(client, $0, $1) }) == 0 else { throw BenchFailure("connect") }
        let server = accept(l, nil, nil)
        defer { close(server) }
        let reader = try ExactReader(FileDescriptor(rawValue: server), options: .init(backend: backend))
        let body = [UInt8](repeating: 0x5A, count: 64 << 10)  // fits the loopback buffers: no reader needed yet
        try writeAll(client, Marks.header(8 << 20), 4)
        try body.withUnsafeBytes { try writeAll(client, $0.baseAddress!, $0.count) }
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(client, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        close(client)  // RST
        do {
            _ = try reader.readFrame()
            throw BenchFailure("a reset body produced a frame")
        } catch let e as Errno where e == .connectionReset {
        }
        counts.withLock { $0.resets += 1 }
    }
}

/// writeAll for an array.
func writeAll(_ fd: Int32, _ bytes: [UInt8], _ count: Int) throws {
    try bytes.withUnsafeBytes { try writeAll(fd, $0.baseAddress!, count) }
}
