import ExactIO
import Foundation
import Glibc
import Synchronization
import SystemPackage

// bench --soak MINUTES: mixed frame sizes (0 B to 16 MiB) over unix and tcp on both backends
// at once, views held for random numbers of frames, every frame verified; RSS sampled every
// second. Fails when a frame is wrong or RSS keeps growing after warm-up.

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
        if streams.contains(where: { $0.failure != nil }) { break }
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
            let ok = f.withUnsafeBytes { b in
                for k in 0..<n where b[k] != SoakSequence.byte(i, k) { return false }
                return true
            }
            guard ok else { s.fail("frame \(i): content differs"); return }
            held.append((i + Int(hold.next() % 64), f, i))
            held.removeAll { $0.release <= i }
            if held.count > s.heldMax.load(ordering: .relaxed) { s.heldMax.store(held.count, ordering: .relaxed) }
            // A held view must never change: re-check one of them every frame.
            if let h = held.first, h.view.count > 0, h.view[h.view.count / 2] != SoakSequence.byte(h.index, h.view.count / 2) {
                s.fail("held view of frame \(h.index) changed")
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
