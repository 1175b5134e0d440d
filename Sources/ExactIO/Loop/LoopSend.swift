import Synchronization
import SystemPackage

// The send side of a connection on a loop: what its writer and the loop's thread share (behind
// a lock of its own, apart from the reader's, so a reader and a writer of one connection never
// wait for each other), the machine's send state (`LoopMachine+Send.swift` decides with it), and
// what a kernel backend keeps for the send in flight.

/// One write call as the loop carries it out: the bytes of `views`, in order, from `sent` on.
struct SendRequest: Sendable {
    let views: [ByteView]
    let total: Int
    /// Whether the views may go out zero-copy (the writer's own copies may not: they are reused).
    let zeroCopyAllowed: Bool
    /// Bytes the kernel took so far, and how many of them zero-copy.
    var sent = 0
    var sentZeroCopy = 0
    /// Sends submitted (io_uring) or sendmsg calls (epoll) for this request.
    var sends = 0
    /// Zero-copy sends the kernel refused (they were sent again, copying).
    var refusals = 0
    var done = false
    /// Why the request ended early (`.canceled`: the writer or a deadline asked; nothing more
    /// goes out).
    var error: Errno? = nil
}

final class LoopSender: @unchecked Sendable {
    // @unchecked Sendable: `shared` is behind its lock, `holders` is atomic, `zeroCopyMinimum`
    // is immutable; the `var`s after them are touched only on the loop's thread.

    /// What the writer and the loop share.
    struct Shared {
        /// The write in progress (one at a time: a writer has one owner).
        var request: SendRequest? = nil
        /// The writer waiting for a change.
        var waiter: CheckedContinuation<Void, Never>? = nil
        /// The writer's deadline (CLOCK_MONOTONIC ns, 0 = none) and whether it passed.
        var deadline: Int64 = 0
        var timedOut = false
        var shutDown = false
        /// The loop's kernel interface failed for good.
        var failure: Errno? = nil
        /// Bytes zero-copy sends took whose notification has not come: memory the loop keeps
        /// for the writer after its calls returned (backpressure counts it).
        var pinned = 0
        /// Notifications still to come.
        var notificationsPending = 0
    }
    let shared = Locked(Shared())
    /// The reader and the writer that use the connection (or the writer alone); each takes
    /// one away when it goes. At 0 nobody can use the descriptor any more.
    private let holders: Atomic<Int>
    /// Writes of at least this many bytes of views may go out zero-copy (`Int.max`: never).
    let zeroCopyMinimum: Int

    init(holders: Int, zeroCopyMinimum: Int) {
        self.holders = Atomic(holders)
        self.zeroCopyMinimum = zeroCopyMinimum
    }

    /// A user of the connection goes (any thread).
    func leave() {
        holders.subtract(1, ordering: .acquiringAndReleasing)
    }

    /// Nobody uses the connection any more (for a loop that has ended: the last to go closes).
    var everyoneLeft: Bool { holders.load(ordering: .acquiring) <= 0 }

    deinit {
        iov?.deallocate()
        msg.deallocate()
    }

    // MARK: The loop's state (its thread only)

    enum Phase {
        case idle
        case inFlight
        /// In flight, and asked to end early.
        case canceling
    }
    var phase = Phase.idle
    /// The writer left (`detachSender`).
    var gone = false
    /// The kernel refused a zero-copy send on this socket (EOPNOTSUPP, EINVAL): the rest go
    /// out copying.
    var zeroCopyRefused = false
    /// The send in flight: its id, whether it is zero-copy, and the views it sends from (kept
    /// alive until its completion).
    var nextID: UInt32 = 0
    var inFlightID: UInt32 = 0
    var inFlightZeroCopy = false
    var inFlightViews: [ByteView] = []
    /// Views of zero-copy sends the kernel may still read, by send id, with the bytes each
    /// send took: released at the send's notification, never before.
    var held: [UInt32: (views: [ByteView], bytes: Int)] = [:]
    /// The deadline the loop's timer for this writer fires at (0: none armed).
    var timerAt: Int64 = 0
    /// `IOLoop.withConnection` waits for the loop to close its descriptor.
    var onRelease: CheckedContinuation<Void, Never>? = nil

    /// The loop closed its descriptor for the connection.
    func released() {
        onRelease.take()?.resume()
    }

    // MARK: What a backend keeps (its thread only)

    /// The iovecs of the send in flight (the machine fills them; valid until its completion),
    /// and a msghdr for a gathered send.
    private(set) var iov: UnsafeMutablePointer<iovec>? = nil
    private(set) var iovCapacity = 0
    let msg: UnsafeMutablePointer<msghdr> = {
        let m = UnsafeMutablePointer<msghdr>.allocate(capacity: 1)
        m.initialize(to: msghdr())
        return m
    }()

    /// Room for `count` iovecs (the old ones are not kept).
    func iovecs(_ count: Int) -> UnsafeMutablePointer<iovec> {
        if count > iovCapacity {
            iov?.deallocate()
            iovCapacity = max(count, 4)
            iov = .allocate(capacity: iovCapacity)
        }
        return iov!
    }

    struct KernelState {
        /// io_uring: the user_data of the send in flight (what a cancel names).
        var tag: UInt64 = 0
        /// epoll: the send in flight waits for EPOLLOUT.
        var pending: UnsafeBufferPointer<iovec>? = nil
    }
    var kernel = KernelState()

    // MARK: - The loop's side of the shared state

    /// Changes the shared state and wakes the waiting writer.
    func wake(_ change: (inout Shared) -> Void) {
        let waiter = shared.withLock { s -> CheckedContinuation<Void, Never>? in
            change(&s)
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// The loop's deadline check (as `LoopConnection.expire`).
    func expire(now: Int64) -> LoopConnection.Expiry {
        let (expiry, waiter) = shared.withLock { s -> (LoopConnection.Expiry, CheckedContinuation<Void, Never>?) in
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

    // MARK: - The writer's side

    /// Waits until `ready` holds for the shared state (looked at under the lock before
    /// suspending), the loop wakes the writer (it then looks again), or (with `cancellable`)
    /// the task is cancelled.
    func wait(cancellable: Bool, until ready: (Shared) -> Bool) async {
        if cancellable {
            await withTaskCancellationHandler {
                await suspend(cancellable: true, ready)
            } onCancel: {
                let w = shared.withLock { s -> CheckedContinuation<Void, Never>? in
                    let w = s.waiter
                    s.waiter = nil
                    return w
                }
                w?.resume()
            }
        } else {
            await suspend(cancellable: false, ready)
        }
    }

    private func suspend(cancellable: Bool, _ ready: (Shared) -> Bool) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = shared.withLock { s -> Bool in
                if ready(s) || (cancellable && Task.isCancelled) { return true }
                s.waiter = c
                return false
            }
            if now { c.resume() }
        }
    }
}

/// Views kept forever: zero-copy sends whose notification never came before the loop's ring
/// closed (or failed), so the kernel may still read their memory; like a quarantined region,
/// it is never reused.
let zeroCopyQuarantine = Locked<[[ByteView]]>([])
