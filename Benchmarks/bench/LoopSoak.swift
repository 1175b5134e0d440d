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
//
// The writer's shapes, per connection (k % 8): 1 trickles frames up to 1 KiB a byte per write
// (one-byte segments); 2 ends every write one byte into the next frame (frames always
// straddle, bytes are always buffered); the rest write up to 64 KiB at a time. One more
// connection per loop sends over-long varints (10 to 4,000 bytes) trickled in writes of 1 to
// 16 bytes, each followed by a good varint-prefixed frame: its reader must see every prefix
// refused (`frameTooLarge` of UInt64.max) and every frame after one whole.

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
    var varintPair: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &varintPair) == 0 else {
        result.fail("socketpair: \(Errno(rawValue: errno))")
        for (a, b) in pairs { close(a); close(b) }
        await loop.shutdown()
        return
    }
    let seeds = (0..<connections).map { UInt64(1000 + $0 + (result.backend == .posix ? 5000 : 0)) }
    let writerDone = DispatchSemaphore(value: 0)
    let writeEnds = pairs.map(\.1)
    let varintEnd = varintPair[1]
    let writer = Thread {
        loopSoakWrite(writeEnds, seeds: seeds, varint: varintEnd)
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
    let varintRead = varintPair[0]
    await withTaskGroup(of: Void.self) { group in
        for (k, pair) in pairs.enumerated() {
            let fd = pair.0
            let seed = seeds[k]
            group.addTask { await loopSoakRead(fd: fd, seed: seed, loop: loop, result: result) }
        }
        group.addTask { await loopSoakReadVarints(fd: varintRead, loop: loop, result: result) }
    }
    readersDone.store(true, ordering: .releasing)
    writerDone.wait()
    for (a, _) in pairs { close(a) }
    close(varintRead)
    result.statistics.withLock { $0 = loop.statistics }
    await loop.shutdown()
}

/// Writes every connection's frame sequence, round robin, in the connection's shape (see the
/// top of this file), and the over-long varints to `varint`, until the soak stops (or every
/// reader is gone); then closes the write ends.
func loopSoakWrite(_ fds: [Int32], seeds: [UInt64], varint: Int32) {
    var seqs = seeds.map { SoakSequence(seed: $0) }
    // Per connection: bytes generated and not yet written (from `offsets`), and where each
    // frame in them ends.
    var pending = Array(repeating: [UInt8](), count: fds.count)
    var ends = Array(repeating: [Int](), count: fds.count)
    var offsets = Array(repeating: 0, count: fds.count)
    var indices = Array(repeating: 0, count: fds.count)
    var live = Array(repeating: true, count: fds.count)
    var varints = SoakSequence(seed: 0xBAD)
    var varintBytes: [UInt8] = []
    var varintOffset = 0
    var varintLive = true
    func generate(_ k: Int) {
        let n = loopSoakSize(&seqs[k])
        let i = indices[k]
        pending[k] += Marks.header(n)
        pending[k].reserveCapacity(pending[k].count + n)
        for j in 0..<n { pending[k].append(SoakSequence.byte(i, j)) }
        ends[k].append(pending[k].count)
        indices[k] += 1
    }
    while !soakStop.load(ordering: .relaxed) && (live.contains(true) || varintLive) {
        for k in 0..<fds.count where live[k] {
            // Two frames ahead: a straddling write reaches into the next one.
            while ends[k].count < 2 { generate(k) }
            let frameEnd = ends[k][0]
            var chunk: Int
            switch k % 8 {
            case 1 where frameEnd - offsets[k] <= 1028:
                chunk = 1  // the last KiB of every frame, a byte per write
            case 2:
                chunk = frameEnd + 1 - offsets[k]  // the rest of this frame and the next's first byte
            default:
                chunk = 64 << 10
            }
            chunk = max(1, min(chunk, 64 << 10, pending[k].count - offsets[k]))
            let w = pending[k].withUnsafeBytes { write(fds[k], $0.baseAddress! + offsets[k], chunk) }
            if w < 0 {
                if errno != EINTR { live[k] = false }  // its reader is gone (it reports why)
                continue
            }
            offsets[k] += w
            while let e = ends[k].first, e <= offsets[k] { ends[k].removeFirst() }
            if offsets[k] >= 1 << 20 {
                pending[k].removeFirst(offsets[k])
                for j in ends[k].indices { ends[k][j] -= offsets[k] }
                offsets[k] = 0
            }
        }
        if varintLive {
            if varintOffset == varintBytes.count {
                varintBytes = loopSoakVarintRound(&varints)
                varintOffset = 0
            }
            let chunk = min(1 + Int(varints.next() % 16), varintBytes.count - varintOffset)
            let w = varintBytes.withUnsafeBytes { write(varint, $0.baseAddress! + varintOffset, chunk) }
            if w < 0 {
                if errno != EINTR { varintLive = false }
            } else {
                varintOffset += w
            }
        }
    }
    for fd in fds { close(fd) }
    close(varint)
}

/// One round of the varint connection: an over-long prefix (10 to 4,000 bytes with the
/// continuation bit, then its last byte), then a good frame: a varint length and that many
/// bytes (0 to 300; byte k of the body is k mod 251).
func loopSoakVarintRound(_ seq: inout SoakSequence) -> [UInt8] {
    let garbage = 10 + Int(seq.next() % 3991)
    var bytes = [UInt8](repeating: 0x80, count: garbage)
    bytes.append(0x01)
    var n = Int(seq.next() % 301)
    let length = n
    repeat {
        bytes.append(UInt8(n & 0x7f) | (n >= 0x80 ? 0x80 : 0))
        n >>= 7
    } while n > 0
    for k in 0..<length { bytes.append(UInt8(k % 251)) }
    return bytes
}

/// The varint connection's reader: every over-long prefix is refused, every frame after one
/// arrives whole.
func loopSoakReadVarints(fd: Int32, loop: IOLoop, result: LoopSoakResult) async {
    let reader: AsyncExactReader
    do {
        reader = try AsyncExactReader(FileDescriptor(rawValue: fd), loop: loop)
    } catch {
        result.fail("AsyncExactReader (varints): \(error)")
        return
    }
    defer { shutdown(fd, Int32(SHUT_RD)) }
    var round = 0
    do {
        while !soakStop.load(ordering: .relaxed) && result.failure == nil {
            do {
                let f = try await reader.readFrame(prefix: .varint)
                if f == nil && soakStop.load(ordering: .relaxed) { return }
                result.fail("\(result.backend) varint round \(round): an over-long prefix was accepted (\(f.map { "\($0.count) bytes" } ?? "end"))")
                return
            } catch ExactReadError.frameTooLarge(let length, _) where length == .max {}
            guard let f = try await reader.readFrame(prefix: .varint) else {
                if !soakStop.load(ordering: .relaxed) { result.fail("\(result.backend) varint round \(round): early end") }
                return
            }
            let ok = f.withUnsafeBytes { b in (0..<b.count).allSatisfy { b[$0] == UInt8($0 % 251) } }
            guard ok else {
                result.fail("\(result.backend) varint round \(round): the frame after the refused prefix differs")
                return
            }
            result.frames.add(1, ordering: .relaxed)
            round += 1
        }
    } catch ExactReadError.incomplete(_, _) where soakStop.load(ordering: .relaxed) {
    } catch ExactReadError.frameTooLarge(_, _) where soakStop.load(ordering: .relaxed) {
    } catch {
        if !soakStop.load(ordering: .relaxed) { result.fail("\(result.backend) varint round \(round): \(error)") }
    }
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
