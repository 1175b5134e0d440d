@_spi(Testing) import ExactIO
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

// The soak's many-connection part: one IOLoop per backend (io_uring, epoll), 64 connections
// each, one writer thread per loop feeding every connection its own endless frame sequence
// (0 B to 4 MiB), one task per connection verifying every frame in full, views held for a
// while, and now and then a read cancelled mid-frame (then retried: the same frame must
// arrive whole). Runs until `soakStop`.

final class LoopSoakResult: Sendable {
    let backend: ExactReader.Backend
    let frames = Atomic<Int>(0)
    let bytes = Atomic<Int>(0)
    let cancelled = Atomic<Int>(0)
    let failureText = Mutex<String?>(nil)
    let statistics = Mutex<IOLoop.Statistics?>(nil)
    var failure: String? { failureText.withLock { $0 } }
    func fail(_ why: String) { failureText.withLock { if $0 == nil { $0 = why } } }
    init(backend: ExactReader.Backend) { self.backend = backend }
}

/// Frame sizes for the loop soak: 70 % up to 4 KiB, 29 % up to 256 KiB, 1 % up to 4 MiB.
func loopSoakSize(_ seq: inout SoakSequence) -> Int {
    let r = seq.next() % 100
    let x = Int(seq.next() % UInt64(Int.max))
    switch r {
    case ..<70: return x % 4097
    case ..<99: return x % ((256 << 10) + 1)
    default: return x % ((4 << 20) + 1)
    }
}

func runLoopSoak(_ result: LoopSoakResult, connections: Int = 64) async {
    signal(SIGPIPE, SIG_IGN)
    let loop: IOLoop
    do {
        loop = try IOLoop(options: .init(backend: result.backend))
    } catch {
        result.fail("IOLoop: \(error)")
        return
    }
    var pairs: [(Int32, Int32)] = []
    for _ in 0..<connections {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            result.fail("socketpair: \(Errno(rawValue: errno))")
            for (a, b) in pairs { close(a); close(b) }
            await loop.shutdown()
            return
        }
        pairs.append((fds[0], fds[1]))
    }
    let seeds = (0..<connections).map { UInt64(1000 + $0 + (result.backend == .posix ? 5000 : 0)) }
    let writerDone = DispatchSemaphore(value: 0)
    let writeEnds = pairs.map(\.1)
    let writer = Thread {
        loopSoakWrite(writeEnds, seeds: seeds)
        writerDone.signal()
    }
    writer.stackSize = 1 << 20
    writer.start()
    // A stall is a failure, with the loop's state: no frame for 10 s while the soak runs. The
    // loop is then shut down (pending reads fail), so that the soak ends instead of hanging;
    // likewise when readers are still waiting 10 s after the soak stopped.
    let readersDone = Atomic<Bool>(false)
    let watchdog = Thread {
        var last = -1
        var still = 0
        while !readersDone.load(ordering: .acquiring) {
            sleep(1)
            let f = result.frames.load(ordering: .relaxed)
            still = f == last ? still + 1 : 0
            last = f
            if still == 10 {
                if !soakStop.load(ordering: .relaxed) {
                    result.fail("\(result.backend): no frame for 10 s; loop state:\n\(loop.debugState())")
                }
                Task { await loop.shutdown() }
            }
        }
    }
    watchdog.start()
    await withTaskGroup(of: Void.self) { group in
        for (k, pair) in pairs.enumerated() {
            let fd = pair.0
            let seed = seeds[k]
            group.addTask { await loopSoakRead(fd: fd, seed: seed, loop: loop, result: result) }
        }
    }
    readersDone.store(true, ordering: .releasing)
    writerDone.wait()
    for (a, _) in pairs { close(a) }
    result.statistics.withLock { $0 = loop.statistics }
    await loop.shutdown()
}

/// Writes every connection's frame sequence, round robin, up to 64 KiB per connection per turn,
/// until the soak stops (or every reader is gone); then closes the write ends.
func loopSoakWrite(_ fds: [Int32], seeds: [UInt64]) {
    var seqs = seeds.map { SoakSequence(seed: $0) }
    var pending = Array(repeating: [UInt8](), count: fds.count)
    var offsets = Array(repeating: 0, count: fds.count)
    var indices = Array(repeating: 0, count: fds.count)
    var live = Array(repeating: true, count: fds.count)
    while !soakStop.load(ordering: .relaxed) && live.contains(true) {
        for k in 0..<fds.count where live[k] {
            if offsets[k] == pending[k].count {
                let n = loopSoakSize(&seqs[k])
                var bytes = Marks.header(n)
                bytes.reserveCapacity(4 + n)
                let i = indices[k]
                for j in 0..<n { bytes.append(SoakSequence.byte(i, j)) }
                pending[k] = bytes
                offsets[k] = 0
                indices[k] += 1
            }
            let chunk = min(64 << 10, pending[k].count - offsets[k])
            let w = pending[k].withUnsafeBytes { write(fds[k], $0.baseAddress! + offsets[k], chunk) }
            if w < 0 {
                if errno != EINTR { live[k] = false }  // its reader is gone (it reports why)
                continue
            }
            offsets[k] += w
        }
    }
    for fd in fds { close(fd) }
}

/// One connection's reader: verifies every frame; holds views for 0-31 frames; every ~40th
/// read is cancelled after a moment and retried.
func loopSoakRead(fd: Int32, seed: UInt64, loop: IOLoop, result: LoopSoakResult) async {
    let reader: AsyncExactReader
    do {
        reader = try AsyncExactReader(FileDescriptor(rawValue: fd), loop: loop)
    } catch {
        result.fail("AsyncExactReader: \(error)")
        return
    }
    // However this ends, the writer's next write to this connection fails (EPIPE) instead of
    // blocking on a reader that is gone.
    defer { shutdown(fd, Int32(SHUT_RD)) }
    var seq = SoakSequence(seed: seed)
    var dice = SoakSequence(seed: seed ^ 0x5EED)
    var held: [(release: Int, view: ByteView, index: Int)] = []
    var i = 0
    do {
        while !soakStop.load(ordering: .relaxed) && result.failure == nil {
            let n = loopSoakSize(&seq)
            var frame: ByteView? = nil
            var attempts = 0
            while true {
                if dice.next() % 40 == 0 {
                    // The reader moves into a task and back once it is over (one owner at a time).
                    nonisolated(unsafe) let r = reader
                    let t = Task { try await r.readFrame() }
                    try? await Task.sleep(for: .microseconds(Int(dice.next() % 2000)))
                    t.cancel()
                    do {
                        frame = try await t.value
                    } catch is CancellationError {
                        result.cancelled.add(1, ordering: .relaxed)
                        attempts += 1
                        continue  // the same frame again: nothing of it may be lost
                    }
                } else {
                    frame = try await reader.readFrame()
                }
                break
            }
            guard let f = frame else {
                if !soakStop.load(ordering: .relaxed) { result.fail("frame \(i): early end of stream") }
                return
            }
            guard f.count == n else { result.fail("\(result.backend) frame \(i): \(f.count) bytes, expected \(n)"); return }
            if let k = SoakSequence.firstMismatch(f, frame: i) {
                let wrong = f.withUnsafeBytes { b in (k..<min(n, k + 64)).filter { b[$0] != SoakSequence.byte(i, $0) }.count }
                result.fail("\(result.backend) frame \(i) (\(n) bytes, \(attempts) cancelled attempts): content differs from byte \(k) (\(wrong) of the next 64 wrong); reader \(reader.statistics)")
                return
            }
            held.append((i + Int(dice.next() % 32), f, i))
            held.removeAll { $0.release <= i }
            if let changed = SoakSequence.changedHeldView(held) {
                result.fail("\(result.backend) held view of frame \(changed) changed")
                return
            }
            result.frames.add(1, ordering: .relaxed)
            result.bytes.add(n, ordering: .relaxed)
            i += 1
        }
    } catch ExactReadError.incomplete(_, _) where soakStop.load(ordering: .relaxed) {
        // the writer stopped mid-frame
    } catch {
        if !soakStop.load(ordering: .relaxed) { result.fail("\(result.backend) frame \(i): \(error)") }
    }
}
