import Synchronization
import SystemPackage

/// A direct read asked of the loop: at least `minimum` bytes into `dst`.
struct DirectRequest: @unchecked Sendable {
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

/// One connection on a loop: what its reader (any thread, one at a time) and the loop's
/// thread share, behind one mutex, plus fields only the loop's thread touches.
final class LoopConnection: @unchecked Sendable {
    // @unchecked Sendable: `state` is behind its mutex; the `var`s below it are touched only on
    // the loop's thread.
    /// The loop's own descriptor for the connection (see `OwnedDescriptor`).
    let fd: OwnedDescriptor
    let loop: IOLoop
    let isSocket: Bool
    let maxBuffered: Int

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
        var direct: DirectRequest? = nil
        /// The reader's deadline (CLOCK_MONOTONIC ns, 0 = none) and whether it passed.
        var deadline: Int64 = 0
        var timedOut = false
        /// The loop shut down.
        var shutDown = false
        /// A receive is armed (or asked for): the reader need not ask again.
        var receiving = false
        /// How much the reader wants received ahead (its read-ahead: a page after a large frame,
        /// whose next body goes straight to its own memory; the staging capacity otherwise).
        var wanted = Int.max

        /// The receive left something for the reader: bytes, an error, or the end.
        var hasNews: Bool { !received.isEmpty || error != nil || eof }
        /// Memory the queued bytes hold, as backpressure counts it.
        var held: Int { received.heldBytes }
    }
    let state = Locked(State())

    // Loop thread only.
    var slot = -1
    var generation: UInt32 = 0
    /// A receive request is in the kernel (io_uring) or the fd is in the epoll set for reading.
    var armed = false
    /// The armed receive is being cancelled (backpressure, or before a direct read).
    var disarming = false
    var directInFlight = false
    var directCancelSent = false
    /// A direct read waits for the armed receive to end.
    var directPending = false
    /// The memory of a receive that went to memory of its own (the pool was dry), in flight.
    var fallback: Region? = nil
    /// The reader asked to receive while the armed receive was being cancelled.
    var rearmWhenDisarmed = false
    /// The byte limit of the armed receive (0: none).
    var receiveLimit: UInt32 = 0
    var detached = false
    var starved = false
    /// The deadline the loop's timer for this connection fires at (0: none armed).
    var timerAt: Int64 = 0
    var registeredWithEpoll = false
    /// epoll: a non-socket descriptor was set non-blocking.
    var nonBlockingSet = false

    init(fd: OwnedDescriptor, loop: IOLoop, isSocket: Bool, maxBuffered: Int) {
        self.fd = fd
        self.loop = loop
        self.isSocket = isSocket
        self.maxBuffered = maxBuffered
    }

    // MARK: - The loop's side

    /// Appends received bytes and wakes the reader. Returns true when the connection should
    /// stop receiving (backpressure).
    func deliver(_ segment: Segment) -> Bool {
        let (waiter, full) = state.withLock { s -> (CheckedContinuation<Void, Never>?, Bool) in
            s.copied += s.received.append(segment)
            let w = s.waiter
            s.waiter = nil
            return (w, s.held >= maxBuffered)
        }
        waiter?.resume()
        return full
    }

    /// Records the end of receiving: end of stream (`error` nil), or an error.
    func finishReceiving(eof: Bool, error: Errno?) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if eof { s.eof = true }
            if let error { s.error = error }
            s.receiving = false
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// The receive stopped without news (cancelled for backpressure or before a direct read,
    /// or ended at its byte limit): the reader must ask again if it wants more. A reader that
    /// already waits is woken to do so: it may have looked at `receiving` just before it was
    /// cleared, and would otherwise wait for a receive nobody armed (a hang, seen under load).
    /// (Ran out of buffers is not this: the loop re-arms starved connections itself.)
    func receivingStopped() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.receiving = false
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// Records progress of the direct read; `finished` completes it.
    func directProgress(_ bytes: Int, finished: Bool, error: Errno?, retry: Bool = false) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard s.direct != nil else { return nil }
            s.direct!.got += bytes
            if finished {
                s.direct!.done = true
                s.direct!.error = error
                s.direct!.retry = retry
            }
            guard finished else { return nil }
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
    /// direct read in flight is given up with its memory (the kernel may still write it).
    func fail(_ error: Errno, directInFlight: Bool) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.error = s.error ?? error
            s.receiving = false
            if s.direct != nil && !s.direct!.done {
                s.direct!.done = true
                s.direct!.error = error
                s.direct!.poisoned = directInFlight
            }
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// Wakes the reader for a shutdown.
    func interrupt(shutDown: Bool) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if shutDown { s.shutDown = true }
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
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

    /// The user_data of this connection's requests of `kind`.
    func tag(_ kind: LoopTag.Kind) -> UInt64 {
        LoopTag(slot: slot, generation: generation, kind: kind).rawValue
    }

    // MARK: - The reader's side

    /// Waits until the loop reports something (data, end, error, a finished direct read, a
    /// deadline, a shutdown). With `cancellable`, a cancelled task also ends the wait.
    /// With `direct`, only what ends or interrupts the direct read counts (received bytes,
    /// the end or an error are the loop's to resolve first: it sends the read back with `retry`
    /// then). Counting them would spin the reader, and with the loop as its executor, the loop
    /// too, which then never resolves them.
    func wait(cancellable: Bool, direct: Bool = false) async {
        if cancellable {
            await withTaskCancellationHandler {
                await suspend(cancellable: true, direct: direct)
            } onCancel: {
                let w = state.withLock { s -> CheckedContinuation<Void, Never>? in
                    let w = s.waiter
                    s.waiter = nil
                    return w
                }
                w?.resume()
            }
        } else {
            await suspend(cancellable: false, direct: direct)
        }
    }

    private func suspend(cancellable: Bool, direct: Bool) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                // Also news: the receive stopped since the reader last looked (it must re-arm).
                let news = direct
                    ? (s.direct?.done ?? true) || s.shutDown || s.timedOut
                    : !s.received.isEmpty || s.eof || s.error != nil || s.shutDown || s.timedOut
                        || (s.direct?.done ?? false) || (!s.receiving && s.direct == nil)
                if news || (cancellable && Task.isCancelled) { return true }
                s.waiter = c
                return false
            }
            if now { c.resume() }
        }
    }
}

/// A request's user_data: which entry of the loop's table, which incarnation, what for.
struct LoopTag: RawRepresentable {
    enum Kind: UInt64 {
        case receive = 1, direct, cancel, accept, wake, cancelAll
    }
    let rawValue: UInt64

    init(rawValue: UInt64) { self.rawValue = rawValue }

    init(slot: Int, generation: UInt32, kind: Kind) {
        rawValue = UInt64(generation) << 32 | UInt64(UInt32(truncatingIfNeeded: slot)) << 8 | kind.rawValue
    }

    var kind: Kind? { Kind(rawValue: rawValue & 0xff) }
    var slot: Int { Int(rawValue >> 8 & 0xff_ffff) }
    var generation: UInt32 { UInt32(truncatingIfNeeded: rawValue >> 32) }
}
