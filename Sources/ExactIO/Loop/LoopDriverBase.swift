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
    // @unchecked Sendable: `fd` and `queue` are immutable (the queue is thread-safe); the `var`s are touched only on the loop's thread.
    let fd: FileDescriptor
    let queue: AcceptQueue
    var slot = -1
    var generation: UInt32 = 0
    var armed = false
    var closing = false

    init(fd: FileDescriptor, queue: AcceptQueue) {
        self.fd = fd
        self.queue = queue
    }
}

/// What both loop backends share: the table of connections and listeners (indexed by the
/// slot in each request's tag), command handling, deadlines and shutdown bookkeeping. The
/// kernel-specific parts are the subclasses' (`URingLoopDriver`, `EpollDriver`).
class LoopDriverBase {
    enum Entry {
        case connection(LoopConnection)
        case listener(Listener)
    }
    private(set) var entries: [Entry?] = []
    private var generations: [UInt32] = []
    private var freeSlots: [Int] = []
    /// Connections with a deadline to watch.
    private var watched: [LoopConnection] = []
    /// Connections waiting for receive buffers.
    var starved: [LoopConnection] = []
    var stopping = false
    let pool: ReceivePool

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

    func release(slot: Int) {
        guard slot >= 0, slot < entries.count, entries[slot] != nil else { return }
        entries[slot] = nil
        generations[slot] &+= 1
        freeSlots.append(slot)
    }

    /// The entry a completion's tag names, if it is still the same incarnation.
    func entry(_ tag: LoopTag) -> Entry? {
        let slot = tag.slot
        guard slot < entries.count, generations[slot] == tag.generation else { return nil }
        return entries[slot]
    }

    /// Frees a detached connection's slot once nothing of it is in the kernel.
    func releaseIfIdle(_ c: LoopConnection) {
        if c.detached && !c.armed && !c.directInFlight && !c.disarming && c.slot >= 0 {
            release(slot: c.slot)
            c.slot = -1
        }
    }

    // MARK: Deadlines

    func watch(_ c: LoopConnection) {
        if !c.watched {
            c.watched = true
            watched.append(c)
        }
    }

    /// Nanoseconds until the nearest deadline (0: none). A deadline counts whether or not its
    /// reader waits yet: the reader publishes it before it suspends, and the loop must not sleep
    /// past it in between (that was a hang: the loop slept with no timeout, the reader waited).
    func nearestDeadline() -> Int64 {
        var nearest: Int64 = 0
        for c in watched {
            let d = c.state.withLock { $0.deadline }
            if d > 0 && (nearest == 0 || d < nearest) { nearest = d }
        }
        guard nearest > 0 else { return 0 }
        return max(1, nearest - monotonicNanoseconds())
    }

    /// Wakes readers whose deadline passed (and cancels their direct read); forgets
    /// connections whose call ended (the reader clears its deadline then).
    func expireDeadlines() {
        guard !watched.isEmpty else { return }
        let now = monotonicNanoseconds()
        var keep: [LoopConnection] = []
        for c in watched {
            if c.detached {
                c.watched = false
                continue
            }
            switch c.expire(now: now) {
            case .none:
                c.watched = false
            case .pending:
                keep.append(c)
            case .expired:
                c.watched = false
                if c.directInFlight { cancelDirect(c) }
            }
        }
        watched = keep
    }

    // MARK: Commands

    func handle(_ command: LoopCommand, loop: IOLoop) {
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
            releaseIfIdle(c)
        case .deadline(let c):
            watch(c)
        case .listen(let l):
            attach(l)
            if stopping {
                l.queue.finish()
            } else {
                startAccept(l, loop: loop)
            }
        case .unlisten(let l):
            l.closing = true
            stopAccept(l)
        case .shutdown:
            break  // the loop's run() handles it
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
    func clearTable() {
        entries.removeAll()
        generations.removeAll()
        freeSlots.removeAll()
        watched.removeAll()
        starved.removeAll()
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

    // MARK: Kernel-specific (subclasses)

    func startReceive(_ c: LoopConnection, loop: IOLoop) { fatalError("abstract") }
    func stopReceive(_ c: LoopConnection) { fatalError("abstract") }
    func startDirect(_ c: LoopConnection, loop: IOLoop) { fatalError("abstract") }
    func cancelDirect(_ c: LoopConnection) { fatalError("abstract") }
    func detachKernel(_ c: LoopConnection) {}
    func startAccept(_ l: Listener, loop: IOLoop) { fatalError("abstract") }
    func stopAccept(_ l: Listener) { fatalError("abstract") }
}
