import Synchronization
import SystemPackage

// Accepting on a loop: the AcceptedConnections sequence, the queue of accepted descriptors its
// consumer has not taken (bounded), and the loop's Listener.

extension IOLoop {
    /// The connections accepted on `listener`, as they come: multishot accept on io_uring,
    /// readiness and `accept4(2)` on epoll (the listener is then set non-blocking).
    ///
    /// Each element is a new descriptor (close-on-exec and non-blocking) that the caller owns
    /// and closes. The sequence ends when the loop shuts down or the iteration stops (a
    /// `break`, a cancelled task); descriptors accepted but not yet taken are closed then. It
    /// throws the errno of a listener that fails for good. A passing shortage (EMFILE or
    /// ENFILE at the descriptor limit, ENOBUFS, ENOMEM) pauses accepting for 10 ms, doubling
    /// up to a second while it lasts, instead of retrying at once. At most
    /// `Options.maxPendingConnections` accepted descriptors wait for the consumer: past that,
    /// accepting pauses until it takes some, and new connections wait in the kernel's backlog.
    /// `listener` is borrowed: it stays open (the loop accepts on a duplicate of it).
    public func connections(accepting listener: FileDescriptor) -> AcceptedConnections {
        AcceptedConnections(loop: self, listener: listener)
    }
}

/// A listener the loop accepts connections on, for `IOLoop.connections(accepting:)`.
final class Listener: @unchecked Sendable {
    // @unchecked Sendable: `fd` and `queue` are immutable (the queue is thread-safe); the `var`s
    // are touched only on the loop's thread.
    /// The loop's own descriptor for the listener (a dup of the caller's), closed when the
    /// listener leaves the loop's table.
    let fd: OwnedDescriptor
    let queue: AcceptQueue
    var token = LoopToken()
    /// Accepts asked of the backend whose completion has not come.
    var inFlight = 0
    var closing = false
    /// The consumer has `maxPendingConnections` accepted descriptors it has not taken:
    /// accepting waits until it takes some (the rest wait in the kernel's backlog).
    var paused = false
    /// A shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) stopped accepting until this time
    /// (CLOCK_MONOTONIC ns; 0: none), and the next pause's length.
    var retryAt: Int64 = 0
    var backoff: Int64 = 0

    /// What the backend keeps for the listener.
    struct KernelState {
        /// epoll: in the epoll set, and how many accepts it may still make.
        var epollRegistered = false
        var acceptBudget = 0
    }
    var kernel = KernelState()

    init(fd: OwnedDescriptor, queue: AcceptQueue) {
        self.fd = fd
        self.queue = queue
    }
}

/// Connections accepted on a listener by a loop (`IOLoop.connections(accepting:)`).
public struct AcceptedConnections: AsyncSequence, Sendable {
    /// An accepted connection's descriptor, owned by the caller (close it when done).
    public typealias Element = FileDescriptor
    let loop: IOLoop
    let listener: FileDescriptor

    /// The iterator that accepts the next connection each time it is asked.
    public func makeAsyncIterator() -> Iterator {
        let queue = AcceptQueue(limit: loop.options.maxPendingConnections)
        let fd: OwnedDescriptor
        do {
            fd = try OwnedDescriptor(duplicating: listener)
        } catch {
            // No descriptor for the loop's copy (EMFILE, EBADF): the sequence throws that.
            loop.options.logger?.debug(
                "ExactIO listener failed", metadata: ["exactio.listener_fd": "\(listener.rawValue)", "exactio.error": "\(error)"])
            queue.finish(throwing: error)
            return Iterator(handle: AcceptHandle(queue: queue))
        }
        let l = Listener(fd: fd, queue: queue)
        queue.onStop = { [loop] in loop.send(.unlisten(l)) }
        queue.onResume = { [loop] in loop.send(.resumeAccept(l)) }
        loop.send(.listen(l))
        return Iterator(handle: AcceptHandle(queue: queue))
    }

    /// Accepts connections one by one on the loop.
    public struct Iterator: AsyncIteratorProtocol {
        let handle: AcceptHandle

        /// The next accepted descriptor, or nil when the sequence ended.
        public mutating func next() async throws -> FileDescriptor? {
            try await handle.queue.next()
        }
    }
}

/// The iterator's hold on its queue: when the iteration is dropped, accepting stops.
public final class AcceptHandle: Sendable {
    let queue: AcceptQueue
    init(queue: AcceptQueue) { self.queue = queue }
    deinit { queue.stop() }
}

/// Accepted descriptors waiting for the iterator. When the iterator goes, accepting stops and
/// the descriptors not taken are closed.
final class AcceptQueue: @unchecked Sendable {
    // @unchecked Sendable: `state` is behind its lock; `onStop` is set before sharing, and
    // taken (once) under the lock.
    struct State {
        var pending: [FileDescriptor] = []
        var waiter: CheckedContinuation<Void, Never>? = nil
        var finished = false
        var failure: Errno? = nil
        /// `onStop` was called (or need not be).
        var stopped = false
        /// The loop paused accepting at `limit` pending descriptors; `onResume` is owed.
        var paused = false
    }
    let state = Locked(State())
    /// Accepted descriptors that may wait for the consumer before accepting pauses.
    let limit: Int
    var onStop: (@Sendable () -> Void)? = nil
    /// Tells the loop to accept again (the consumer caught up after a pause).
    var onResume: (@Sendable () -> Void)? = nil

    init(limit: Int = .max) {
        self.limit = limit
    }

    /// Descriptors that may still be accepted before the queue is full.
    var room: Int {
        state.withLock { s in s.finished ? 0 : max(0, limit - s.pending.count) }
    }

    /// When the queue is full: marks it paused (the consumer's next take past a quarter of the
    /// bound calls `onResume`) and returns true. False when the consumer took some meanwhile.
    func pauseIfFull() -> Bool {
        state.withLock { s in
            guard s.pending.count >= limit || s.finished else { return false }
            s.paused = true
            return true
        }
    }

    /// Queues `fd` for the consumer (closes it when the sequence has ended). Returns true when
    /// the queue is full: the loop pauses accepting until `onResume`.
    @discardableResult
    func yield(_ fd: FileDescriptor) -> Bool {
        let (waiter, refused, full) = state.withLock { s -> (CheckedContinuation<Void, Never>?, Bool, Bool) in
            if s.finished { return (nil, true, false) }
            s.pending.append(fd)
            let w = s.waiter
            s.waiter = nil
            let full = s.pending.count >= limit
            if full { s.paused = true }
            return (w, false, full)
        }
        if refused { try? fd.close() }
        waiter?.resume()
        return full
    }

    func finish(throwing error: Errno? = nil) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if !s.finished {
                s.finished = true
                s.failure = error
            }
            s.stopped = true  // the loop let go of the listener: nothing to tell it
            onStop = nil
            onResume = nil
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    func next() async throws -> FileDescriptor? {
        while true {
            let (fd, finished, failure, resume) = state.withLock { s -> (FileDescriptor?, Bool, Errno?, (@Sendable () -> Void)?) in
                if !s.pending.isEmpty {
                    let fd = s.pending.removeFirst()
                    // Resume once the consumer took a quarter of the bound (not per descriptor).
                    guard s.paused && !s.finished && s.pending.count <= limit - max(1, limit / 4) else {
                        return (fd, false, nil, nil)
                    }
                    s.paused = false
                    return (fd, false, nil, onResume)
                }
                let f = s.failure
                s.failure = nil
                return (nil, s.finished, f, nil)
            }
            resume?()
            if let fd { return fd }
            if let failure { throw failure }
            if finished { return nil }
            if Task.isCancelled {
                stop()
                return nil
            }
            await withTaskCancellationHandler {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let now = state.withLock { s -> Bool in
                        if !s.pending.isEmpty || s.finished || s.failure != nil || Task.isCancelled { return true }
                        s.waiter = c
                        return false
                    }
                    if now { c.resume() }
                }
            } onCancel: {
                let w = state.withLock { s -> CheckedContinuation<Void, Never>? in
                    let w = s.waiter
                    s.waiter = nil
                    return w
                }
                w?.resume()
            }
        }
    }

    /// Stops accepting (once) and closes what was not taken.
    func stop() {
        let (left, notify) = state.withLock { s -> ([FileDescriptor], (@Sendable () -> Void)?) in
            s.finished = true
            let left = s.pending
            s.pending.removeAll()
            let notify = s.stopped ? nil : onStop
            s.stopped = true
            onStop = nil  // it holds the listener, which holds this queue
            onResume = nil
            return (left, notify)
        }
        for fd in left { try? fd.close() }
        notify?()
    }
}
