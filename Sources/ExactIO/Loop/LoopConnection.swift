import Synchronization
import SystemPackage

// One connection on a loop: the state its reader and the loop's thread share (behind one
// lock), the loop's own state for it (what `LoopMachine` decides with), and what a kernel
// backend keeps for it.

/// A large read asked of the loop: at least `minimum` bytes into `dst`, the body's own memory.
struct LargeReadRequest: @unchecked Sendable {
    // @unchecked Sendable: `dst` is memory of the reader that asked, which waits (and keeps it
    // valid) until the loop marks the request done; only the loop's thread writes into it.
    let dst: UnsafeMutableRawBufferPointer
    let minimum: Int
    let slot: Int32
    var got = 0
    var done = false
    var error: Errno? = nil
    /// Received bytes arrived before the read could start: the reader takes them first.
    var retry = false
    /// The loop gave up on the read while the kernel may still write `dst` (its ring failed).
    var poisoned = false
}

/// Which entry of the loop's table, and which incarnation of it: a completion whose token is
/// not the entry's current one belongs to a connection or listener that is gone.
struct LoopToken: Equatable {
    var slot: Int = -1
    var generation: UInt32 = 0
    var isAttached: Bool { slot >= 0 }
}

/// A request's user_data (or an epoll event's data): a token and what the request is for.
struct LoopTag: RawRepresentable {
    enum Kind: UInt64 {
        case receive = 1, read, cancel, accept, wake, cancelAll
        /// A send, and a zero-copy send (whose token names the backend's record of it).
        case send, sendZC
    }
    let rawValue: UInt64

    init(rawValue: UInt64) { self.rawValue = rawValue }

    init(_ token: LoopToken, _ kind: Kind) {
        rawValue = UInt64(token.generation) << 32 | UInt64(UInt32(truncatingIfNeeded: token.slot)) << 8 | kind.rawValue
    }

    /// A tag of the loop's own (its wakeup, its cancel-everything), outside any slot.
    init(loopOwn kind: Kind) {
        self.init(LoopToken(slot: 0xff_ffff, generation: 0), kind)
    }

    var kind: Kind? { Kind(rawValue: rawValue & 0xff) }
    var token: LoopToken { LoopToken(slot: Int(rawValue >> 8 & 0xff_ffff), generation: UInt32(truncatingIfNeeded: rawValue >> 32)) }
}

final class LoopConnection: @unchecked Sendable {
    // @unchecked Sendable: `state` is behind its lock; the `var`s after it are touched only on
    // the loop's thread.
    /// The loop's own descriptor for the connection (see `OwnedDescriptor`).
    let fd: OwnedDescriptor
    let loop: IOLoop
    let isSocket: Bool
    let maxBuffered: Int
    /// The send side, when the connection has a writer (`AsyncExactWriter`); a connection of
    /// `IOLoop.withConnection` has a reader and a writer.
    let sender: LoopSender?

    /// What the reader and the loop share.
    struct State {
        /// Received bytes the reader has not taken yet, in order.
        var received = SegmentQueue()
        /// Bytes the loop copied to keep `received` short (small segments coalesced, receive
        /// buffers evacuated), for the reader's `bytesCopied`.
        var copied = 0
        var eof = false
        var error: Errno? = nil
        /// The reader waiting for a change.
        var waiter: CheckedContinuation<Void, Never>? = nil
        var largeRead: LargeReadRequest? = nil
        /// The reader's deadline (CLOCK_MONOTONIC ns, 0 = none) and whether it passed.
        var deadline: Int64 = 0
        var timedOut = false
        /// The loop shut down.
        var shutDown = false
        /// A receive is armed (or owed by the loop): the reader need not ask again.
        var receiving = false
        /// The reader copied frames that straddled receive buffers: its receives should go to
        /// memory of its own (`LoopMachine`'s adaptive receive).
        var framesStraddle = false
        /// How much the reader wants received ahead (its read-ahead: a page after a large frame,
        /// whose next body goes straight to its own memory; the staging capacity otherwise).
        var wanted = Int.max

        /// The receive left something for the reader: bytes, an error, or the end.
        var hasNews: Bool { !received.isEmpty || error != nil || eof }
        /// Memory the queued bytes hold, as backpressure counts it.
        var held: Int { received.heldBytes }
    }
    let state = Locked(State())

    // MARK: The loop's state (its thread only; `LoopMachine` decides with it)

    enum ReceivePhase {
        case idle
        /// A receive is in the kernel (io_uring) or the descriptor is in the epoll set.
        case armed
        /// The armed receive is being ended (backpressure, a large read, a detach).
        case disarming
        /// The receive buffers ran dry and not even memory of its own could be had: the loop
        /// owes a receive when buffers come back (`state.receiving` stays set).
        case starved
    }
    enum LargeReadPhase {
        case idle
        /// Asked for, waiting for the armed receive to end (the two would race for the stream).
        case waitingForReceive
        case inFlight
        /// In flight, and asked to end early.
        case canceling
    }
    var token = LoopToken()
    var receive = ReceivePhase.idle
    var largeRead = LargeReadPhase.idle
    /// The reader asked to receive while the armed receive was being ended.
    var rearmAfterDisarm = false
    var detached = false
    /// The deadline the loop's timer for this connection fires at (0: none armed).
    var timerAt: Int64 = 0
    /// Receives into memory of the connection's own (`LoopMachine`'s adaptive receive): set
    /// while the connection is busy or the shared buffers ran dry; nil: the shared buffers.
    var own: OwnReceive? = nil
    /// The last shared-buffer receive brought half a buffer or more at once.
    var busy = false
    /// Bytes of straddling frames a reader copies between two looks that make its receives
    /// go to memory of its own (with `busy`; see `LoopMachine.startReceive`).
    static let straddleCopies = 16 << 10

    /// A busy connection's receive memory: each receive lands right after the last one, so that
    /// frames lie in one piece and are views in place; reused from its start once nothing
    /// references it.
    struct OwnReceive {
        var region: Region
        /// The region before this one, kept while its last bytes are read: the next region
        /// when nothing references it any more (two regions a connection, warm pages).
        var spare: Region? = nil
        /// Bytes of `region` received so far.
        var fill = 0
        /// What the next receive asks for, adapted to what the last ones brought.
        var size: Int
        /// What the armed receive asked for.
        var asked = 0
    }

    /// What the backend keeps for the connection (its thread only).
    struct KernelState {
        /// The connection's own memory a receive is filling, and where.
        var ownTarget: (region: Region, offset: Int, count: Int)? = nil
        /// io_uring: the byte limit of the armed receive (0: none).
        var receiveLimit: UInt32 = 0
        /// epoll: the descriptor is in the epoll set, for what, and whether a receive is armed
        /// (the descriptor may stay in the set between single-shot receives).
        var epollRegistered = false
        var epollInterest: LoopTag.Kind? = nil
        var receiveArmed = false
        /// epoll: a large read waiting for readiness.
        var pendingRead: (dst: UnsafeMutableRawBufferPointer, slot: Int32)? = nil
        /// epoll: a non-socket descriptor was set non-blocking.
        var nonBlockingSet = false
    }
    var kernel = KernelState()

    init(fd: OwnedDescriptor, loop: IOLoop, isSocket: Bool, maxBuffered: Int, sender: LoopSender? = nil) {
        self.fd = fd
        self.loop = loop
        self.isSocket = isSocket
        self.maxBuffered = maxBuffered
        self.sender = sender
    }

    /// The writer is gone too, or there is none, and nothing of its sends is in the kernel
    /// (zero-copy notifications aside: they need the memory, not the descriptor).
    var senderDone: Bool {
        guard let sender else { return true }
        return sender.gone && sender.phase == .idle
    }

    func tag(_ kind: LoopTag.Kind) -> UInt64 {
        LoopTag(token, kind).rawValue
    }

    /// Nothing of the connection is in the kernel any more.
    var isIdleInKernel: Bool {
        (receive == .idle || receive == .starved) && (largeRead == .idle || largeRead == .waitingForReceive)
    }

    // MARK: - The loop's side of the shared state

    /// Appends received bytes and wakes the reader. Returns whether the connection holds its
    /// backpressure bound, and whether the reader has what it wants ahead.
    func enqueue(_ segment: Segment) -> (full: Bool, enough: Bool) {
        let (waiter, full, enough) = state.withLock { s -> (CheckedContinuation<Void, Never>?, Bool, Bool) in
            s.copied += s.received.append(segment)
            let w = s.waiter
            s.waiter = nil
            return (w, s.held >= maxBuffered, s.received.bytes >= s.wanted)
        }
        waiter?.resume()
        return (full, enough)
    }

    /// Records the end of receiving: end of stream (`error` nil), or an error.
    func finishReceiving(eof: Bool, error: Errno?) {
        wake { s in
            if eof { s.eof = true }
            if let error { s.error = error }
            s.receiving = false
        }
    }

    /// The receive stopped without news (cancelled for backpressure or before a large read,
    /// or ended at its byte limit): the reader must ask again if it wants more. A reader that
    /// already waits is woken to do so: it may have looked at `receiving` just before it was
    /// cleared, and would otherwise wait for a receive nobody armed.
    func receivingStopped() {
        wake { $0.receiving = false }
    }

    /// Records progress of the large read; `finished` completes it.
    func largeReadProgress(_ bytes: Int, finished: Bool, error: Errno?, retry: Bool = false) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard s.largeRead != nil else { return nil }
            s.largeRead!.got += bytes
            guard finished else { return nil }
            s.largeRead!.done = true
            s.largeRead!.error = error
            s.largeRead!.retry = retry
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// Moves received bytes that sit in shared receive buffers into memory of their own (the
    /// loop's thread, when the pool ran dry): a slow reader's queue must not starve the others.
    func evacuate() {
        state.withLock { s in
            s.copied += s.received.detachFromReceiveBuffers() ?? 0
        }
    }

    /// The loop's kernel interface failed for good: the reader's call fails with `error`. A
    /// large read in flight is given up with its memory (the kernel may still write it).
    func fail(_ error: Errno, readInFlight: Bool) {
        wake { s in
            s.error = s.error ?? error
            s.receiving = false
            if s.largeRead != nil && !s.largeRead!.done {
                s.largeRead!.done = true
                s.largeRead!.error = error
                s.largeRead!.poisoned = readInFlight
            }
        }
    }

    /// Wakes the reader for a shutdown.
    func interrupt(shutDown: Bool) {
        wake { s in
            if shutDown { s.shutDown = true }
        }
    }

    enum Expiry {
        case none
        /// Not yet: the reader's deadline is this.
        case pending(Int64)
        case expired
    }

    /// The loop's deadline check: past the reader's deadline, `timedOut` is set and the waiter
    /// (if it waits yet) is woken, in one locked step, so a call that just ended (and cleared
    /// its deadline) never sees a timeout meant for it.
    func expire(now: Int64) -> Expiry {
        let (expiry, waiter) = state.withLock { s -> (Expiry, CheckedContinuation<Void, Never>?) in
            if s.deadline == 0 { return (.none, nil) }
            if s.deadline > now { return (.pending(s.deadline), nil) }
            s.deadline = 0
            s.timedOut = true
            let w = s.waiter
            s.waiter = nil
            return (.expired, w)
        }
        waiter?.resume()
        return expiry
    }

    /// Changes the shared state and wakes the waiting reader.
    private func wake(_ change: (inout State) -> Void) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            change(&s)
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    // MARK: - The reader's side

    /// Waits until the loop reports something (data, end, error, a finished large read, a
    /// deadline, a shutdown). With `cancellable`, a cancelled task also ends the wait. With
    /// `largeRead`, only what ends or interrupts the large read counts (received bytes, the
    /// end or an error are the loop's to resolve first: it sends the read back with `retry`
    /// then). Counting them would spin the reader, and with the loop as its executor, the
    /// loop too, which then never resolves them.
    nonisolated(nonsending) func wait(cancellable: Bool, largeRead: Bool = false) async {
        if let manual = loop.manual {
            // A loop without a thread (the fuzz harness): it runs until there is news.
            manual.runUntilNews(for: self, cancellable: cancellable, largeRead: largeRead)
            return
        }
        if cancellable {
            await withTaskCancellationHandler {
                await suspend(cancellable: true, largeRead: largeRead)
            } onCancel: {
                let w = state.withLock { s -> CheckedContinuation<Void, Never>? in
                    let w = s.waiter
                    s.waiter = nil
                    return w
                }
                w?.resume()
            }
        } else {
            await suspend(cancellable: false, largeRead: largeRead)
        }
    }

    /// Whether the reader has something to look at (the condition `wait` waits for).
    func hasNews(cancellable: Bool, largeRead: Bool) -> Bool {
        state.withLock { s in LoopConnection.news(s, largeRead: largeRead) } || (cancellable && Task.isCancelled)
    }

    static func news(_ s: State, largeRead: Bool) -> Bool {
        largeRead
            ? (s.largeRead?.done ?? true) || s.shutDown || s.timedOut
            // Also news: the receive stopped since the reader last looked (it must re-arm).
            : !s.received.isEmpty || s.eof || s.error != nil || s.shutDown || s.timedOut
                || (s.largeRead?.done ?? false) || (!s.receiving && s.largeRead == nil)
    }

    nonisolated(nonsending) private func suspend(cancellable: Bool, largeRead: Bool) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if LoopConnection.news(s, largeRead: largeRead) || (cancellable && Task.isCancelled) { return true }
                s.waiter = c
                return false
            }
            if now { c.resume() }
        }
    }
}
