#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization
import SystemPackage

/// A listener the loop accepts connections on, for `IOLoop.connections(accepting:)`.
final class Listener: @unchecked Sendable {
    // @unchecked Sendable: `fd` and `queue` are immutable (the queue is thread-safe); the `var`s
    // are touched only on the loop's thread.
    /// The loop's own descriptor for the listener (a dup of the caller's), closed when the
    /// listener leaves the loop's table.
    let fd: OwnedDescriptor
    let queue: AcceptQueue
    var slot = -1
    var generation: UInt32 = 0
    var armed = false
    var closing = false
    /// The consumer has `maxPendingConnections` accepted descriptors it has not taken: accepting
    /// waits until it takes some (the rest wait in the kernel's backlog).
    var paused = false
    /// A shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) stopped accepting until this time
    /// (CLOCK_MONOTONIC ns; 0: none), and the next pause's length.
    var retryAt: Int64 = 0
    var backoff: Int64 = 0
    /// io_uring: single-shot accepts in flight (`armed` while there are any).
    var inFlight = 0

    init(fd: OwnedDescriptor, queue: AcceptQueue) {
        self.fd = fd
        self.queue = queue
    }

    var tag: UInt64 { LoopTag(slot: slot, generation: generation, kind: .accept).rawValue }
}

/// What the loop's timers are for.
enum LoopTimer {
    /// A reader's deadline (`LoopConnection.timerAt` says which one is current).
    case deadline(LoopConnection)
    /// Accepting again after a shortage (`Listener.retryAt`).
    case acceptRetry(Listener)
}

/// What both loop backends share: the table of connections and listeners (indexed by the
/// slot in each request's tag), command handling, timers and shutdown bookkeeping. The
/// kernel-specific parts are the subclasses' (`URingLoopDriver`, `EpollDriver`).
class LoopDriverBase {
    enum Entry {
        case connection(LoopConnection)
        case listener(Listener)
    }
    private(set) var entries: [Entry?] = []
    private var generations: [UInt32] = []
    private var freeSlots: [Int] = []
    private var timers = TimerHeap<LoopTimer>()
    /// Connections waiting for receive buffers.
    var starved: [LoopConnection] = []
    var stopping = false
    /// The kernel interface failed for good (`failForGood`): commands are answered with it.
    private(set) var failure: Errno? = nil
    let pool: ReceivePool

    /// Accepting pauses for 10 ms after a shortage, doubling up to a second while it lasts.
    static let acceptBackoff: (first: Int64, last: Int64) = (10_000_000, 1_000_000_000)

    init(pool: ReceivePool) {
        self.pool = pool
    }

    // MARK: Table

    func attach(_ c: LoopConnection) {
        guard c.slot < 0 else { return }
        let slot = takeSlot()
        c.slot = slot
        c.generation = generations[slot]
        entries[slot] = .connection(c)
    }

    func attach(_ l: Listener) {
        let slot = takeSlot()
        l.slot = slot
        l.generation = generations[slot]
        entries[slot] = .listener(l)
    }

    private func takeSlot() -> Int {
        if let s = freeSlots.popLast() { return s }
        entries.append(nil)
        generations.append(1)
        return entries.count - 1
    }

    /// Frees `slot` for reuse; its generation moves on, so completions still tagged with the
    /// old one are recognised as stale.
    private func free(slot: Int) {
        entries[slot] = nil
        generations[slot] &+= 1
        freeSlots.append(slot)
    }

    /// Takes `l` out of the table, if it is still there: by identity, so that a second release
    /// (the accept ended by itself, then the iterator was dropped) cannot free a slot that
    /// belongs to someone else by then. Its descriptor is closed.
    func release(_ l: Listener) {
        guard l.slot >= 0, case .listener(let held)? = entries[l.slot], held === l else { return }
        free(slot: l.slot)
        l.slot = -1
        l.fd.close()
    }

    /// Frees a detached connection's slot once nothing of it is in the kernel, and closes the
    /// loop's descriptor for it.
    func releaseIfIdle(_ c: LoopConnection) {
        guard c.detached && !c.armed && !c.directInFlight && !c.disarming && c.slot >= 0,
              case .connection(let held)? = entries[c.slot], held === c
        else { return }
        free(slot: c.slot)
        c.slot = -1
        c.fd.close()
    }

    /// The entry a completion's tag names, if it is still the same incarnation.
    func entry(_ tag: LoopTag) -> Entry? {
        let slot = tag.slot
        guard slot < entries.count, generations[slot] == tag.generation else { return nil }
        return entries[slot]
    }

    // MARK: Timers

    /// Watches the connection's deadline: one timer per connection at a time, at the earliest
    /// deadline it was asked to watch (a reader's deadlines only move later: its timeout is
    /// fixed).
    func watch(_ c: LoopConnection) {
        let d = c.state.withLock { $0.deadline }
        guard d > 0, c.timerAt == 0 || d < c.timerAt else { return }
        c.timerAt = d
        timers.insert(d, .deadline(c))
    }

    /// Accepting on `l` stopped for a shortage: it starts again after a pause that doubles
    /// while the shortage lasts (no busy loop at the descriptor limit).
    func retryAcceptLater(_ l: Listener) {
        l.backoff = l.backoff == 0 ? Self.acceptBackoff.first : min(2 * l.backoff, Self.acceptBackoff.last)
        l.retryAt = monotonicNanoseconds() + l.backoff
        timers.insert(l.retryAt, .acceptRetry(l))
    }

    /// Nanoseconds until the nearest timer (0: none). A deadline counts whether or not its
    /// reader waits yet: the reader publishes it before it suspends, and the loop must not sleep
    /// past it in between.
    func nearestDeadline() -> Int64 {
        guard let when = timers.nearest else { return 0 }
        return max(1, when - monotonicNanoseconds())
    }

    /// Fires the timers that are due: wakes readers whose deadline passed (and cancels their
    /// direct read), starts accepting again after a pause.
    func expireTimers(loop: IOLoop) {
        guard timers.nearest != nil else { return }
        let now = monotonicNanoseconds()
        while let (when, timer) = timers.popExpired(now: now) {
            switch timer {
            case .deadline(let c):
                guard c.timerAt == when else { continue }  // stale: a later one replaced it
                c.timerAt = 0
                if c.detached { continue }
                switch c.expire(now: now) {
                case .none:
                    break
                case .pending(let later):
                    c.timerAt = later
                    timers.insert(later, .deadline(c))
                case .expired:
                    if c.directInFlight { cancelDirect(c) }
                }
            case .acceptRetry(let l):
                guard l.retryAt == when else { continue }
                l.retryAt = 0
                if !l.closing && !stopping && !l.paused && !l.armed && l.slot >= 0 { startAccept(l, loop: loop) }
            }
        }
    }

    // MARK: Commands

    func handle(_ command: LoopCommand, loop: IOLoop) {
        if let failure {
            answerFailed(command, failure)
            return
        }
        switch command {
        case .receive(let c):
            guard !c.detached else { return }
            attach(c)
            if stopping {
                c.interrupt(shutDown: true)
            } else if c.disarming {
                c.rearmWhenDisarmed = true  // the reader took its bytes meanwhile: go on after
            } else if !c.armed {
                startReceive(c, loop: loop)
            }
        case .direct(let c):
            guard !c.detached else { return }
            attach(c)
            if stopping {
                c.directProgress(0, finished: true, error: .canceled)
            } else if c.armed {
                // The armed receive would race the read for the stream's next bytes: stop it
                // first; the read starts when it has ended.
                c.directPending = true
                if !c.disarming { stopReceive(c) }
            } else {
                startDirect(c, loop: loop)
            }
        case .cancelDirect(let c):
            if c.directInFlight { cancelDirect(c) }
        case .detach(let c):
            c.detached = true
            if c.armed && !c.disarming { stopReceive(c) }
            if c.directInFlight { cancelDirect(c) }
            detachKernel(c)
            if c.slot < 0 {
                c.fd.close()  // never attached: nothing of it is in the kernel
            } else {
                releaseIfIdle(c)
            }
        case .deadline(let c):
            watch(c)
        case .listen(let l):
            attach(l)
            if stopping {
                l.queue.finish()
                release(l)
            } else {
                startAccept(l, loop: loop)
            }
        case .unlisten(let l):
            guard l.slot >= 0 else { return }  // it ended by itself already
            l.closing = true
            stopAccept(l)
        case .resumeAccept(let l):
            guard l.slot >= 0, !l.closing, !stopping else { return }
            l.paused = false
            if !l.armed && l.retryAt == 0 { startAccept(l, loop: loop) }
        case .inspect(let reply):
            reply(describe())
        case .injectFailures(let count, let errno):
            injectEnterFailures(count: count, errno: errno)
        case .shutdown:
            break  // the loop's run() handles it
        }
    }

    /// Accepted `fd` on `l`: handed to the consumer; past `maxPendingConnections` not taken,
    /// accepting pauses until the consumer takes some.
    func accepted(_ fd: Int32, on l: Listener) {
        l.backoff = 0
        if l.queue.yield(FileDescriptor(rawValue: fd)) && !l.paused && !l.closing {
            l.paused = true
            pauseAccept(l)
        }
    }

    /// After a receive ended (cancelled or terminated): start a pending direct read, or resume
    /// receiving for starved connections.
    func receiveEnded(_ c: LoopConnection, loop: IOLoop) {
        c.armed = false
        c.disarming = false
        let rearm = c.rearmWhenDisarmed
        c.rearmWhenDisarmed = false
        if c.directPending && !c.detached {
            c.directPending = false
            startDirect(c, loop: loop)
        } else if rearm && !c.detached && !stopping {
            startReceive(c, loop: loop)
        }
        releaseIfIdle(c)
    }

    /// Buffers came back: connections that starved for them receive again, unless a direct read
    /// took over meanwhile (a receive beside it would race it for the stream's next bytes; the
    /// reader asks again when it wants received bytes).
    func resumeStarved(loop: IOLoop) {
        pool.starved.store(false, ordering: .releasing)
        guard !starved.isEmpty else { return }
        let waiting = starved
        starved.removeAll()
        for c in waiting {
            c.starved = false
            if c.detached || c.armed || c.disarming { continue }
            if c.directInFlight || c.directPending {
                c.receivingStopped()
                continue
            }
            startReceive(c, loop: loop)
        }
    }

    /// The bytes of a read that went to memory of its own (the pool was dry), as a segment. A
    /// short read moves into memory of its exact size (one copy of at most half a buffer, on
    /// this path only): kept as it is, every read would hold a whole buffer's memory for a few
    /// bytes, and a peer sending a byte at a time would make the loop commit a page per byte
    /// received while the pool is dry.
    func ownSegment(_ region: Region, count n: Int) -> Segment {
        if n <= pool.size / 2, let exact = try? Region.standalone(capacity: n) {
            exact.base.copyMemory(from: region.base, byteCount: n)
            return Segment(owner: exact, base: exact.base, start: 0, end: n)
        }
        return Segment(owner: region, base: region.base, start: 0, end: n)
    }

    /// The pool ran dry: received bytes queued for readers that are not reading are moved out of
    /// the shared buffers, so that those buffers come back.
    func evacuateQueues() {
        for case .connection(let c)? in entries { c.evacuate() }
    }

    /// Forgets every connection and listener (their objects hold the loop: a cycle otherwise).
    /// Descriptors of connections whose reader is gone are closed; the others close when their
    /// reader goes.
    func clearTable() {
        for case let entry? in entries {
            switch entry {
            case .connection(let c) where c.detached: c.fd.close()
            case .listener(let l): l.fd.close()
            default: break
            }
        }
        entries.removeAll()
        generations.removeAll()
        freeSlots.removeAll()
        timers.removeAll()
        starved.removeAll()
        pool.starved.store(false, ordering: .releasing)
    }

    /// Every connection's reader is told the loop is going; listeners end.
    func interruptAll() {
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                c.interrupt(shutDown: true)
                if !c.directInFlight {
                    c.directProgress(0, finished: true, error: .canceled)
                }
            case .listener(let l):
                l.closing = true
            }
        }
    }

    /// The kernel interface failed for good (`error`, an io_uring_enter error that is not a
    /// passing one): every reader's pending call fails with it, accept sequences throw it;
    /// memory a direct read in flight targets is given up (`poisoned`: the kernel may still
    /// write it). From then on commands are answered with it, and `shutdown()` does not wait
    /// for requests the kernel can no longer confirm.
    func failForGood(_ error: Errno) {
        failure = error
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                c.fail(error, directInFlight: c.directInFlight)
                c.armed = false
                c.disarming = false
                c.directInFlight = false
            case .listener(let l):
                l.closing = true
                l.armed = false
                l.queue.finish(throwing: error)
            }
        }
    }

    /// `command` after a failure: nothing reaches the kernel.
    private func answerFailed(_ command: LoopCommand, _ error: Errno) {
        switch command {
        case .receive(let c), .direct(let c), .deadline(let c):
            c.fail(error, directInFlight: false)
        case .detach(let c):
            c.detached = true
            if c.slot < 0 { c.fd.close() }  // else: at shutdown (clearTable)
        case .listen(let l):
            l.queue.finish(throwing: error)
            l.fd.close()
        case .unlisten(let l):
            l.queue.finish()
        case .inspect(let reply):
            reply("(the loop failed: \(error))\n" + describe())
        case .cancelDirect, .resumeAccept, .injectFailures, .shutdown:
            break
        }
    }

    /// What the table holds, for `IOLoop.debugState()` (the loop's thread).
    func describe() -> String {
        var lines: [String] = []
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                let s = c.state.withLock { s in
                    "queued \(s.received.bytes) in \(s.received.count) segments, receiving \(s.receiving) eof \(s.eof) waiter \(s.waiter != nil) direct \(s.direct.map { "\($0.got)/\($0.minimum) done \($0.done)" } ?? "-")"
                }
                lines.append("conn \(c.slot): armed \(c.armed) disarming \(c.disarming) starved \(c.starved) directInFlight \(c.directInFlight) pending \(c.directPending) rearm \(c.rearmWhenDisarmed) detached \(c.detached); \(s)")
            case .listener(let l):
                lines.append("listener \(l.slot): armed \(l.armed) paused \(l.paused) closing \(l.closing) retryAt \(l.retryAt)")
            }
        }
        lines.append("timers \(timers.count), starved \(starved.count), stopping \(stopping)")
        return lines.joined(separator: "\n")
    }

    // MARK: Kernel-specific (subclasses)

    func startReceive(_ c: LoopConnection, loop: IOLoop) { fatalError("abstract") }
    func stopReceive(_ c: LoopConnection) { fatalError("abstract") }
    func startDirect(_ c: LoopConnection, loop: IOLoop) { fatalError("abstract") }
    func cancelDirect(_ c: LoopConnection) { fatalError("abstract") }
    func detachKernel(_ c: LoopConnection) {}
    func startAccept(_ l: Listener, loop: IOLoop) { fatalError("abstract") }
    /// Stops accepting for good (the listener closes): the queue ends, the slot is released.
    func stopAccept(_ l: Listener) { fatalError("abstract") }
    /// Stops accepting for now (the consumer is behind); `startAccept` resumes.
    func pauseAccept(_ l: Listener) { fatalError("abstract") }
    func injectEnterFailures(count: Int, errno: Int32) {}
}
