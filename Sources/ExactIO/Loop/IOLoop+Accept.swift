#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization
import SystemPackage

extension IOLoop {
    /// The connections accepted on `listener`, as they come: multishot accept on io_uring,
    /// readiness and `accept4(2)` on epoll (the listener is then set non-blocking).
    ///
    /// Each element is a new descriptor (close-on-exec) that the caller owns and closes. The
    /// sequence ends when the loop shuts down or the iteration stops (a `break`, a cancelled
    /// task); descriptors accepted but not yet taken are closed then. It throws the errno of a
    /// listener that fails for good (a passing shortage — EMFILE, ENOBUFS — only pauses it).
    /// `listener` is borrowed: it stays open.
    public func connections(accepting listener: FileDescriptor) -> AcceptedConnections {
        AcceptedConnections(loop: self, listener: listener)
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
        let queue = AcceptQueue()
        let l = Listener(fd: listener, queue: queue)
        queue.onStop = { [loop] in loop.send(.unlisten(l)) }
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
    }
    let state = Locked(State())
    var onStop: (@Sendable () -> Void)? = nil

    func yield(_ fd: FileDescriptor) {
        let (waiter, refused) = state.withLock { s -> (CheckedContinuation<Void, Never>?, Bool) in
            if s.finished { return (nil, true) }
            s.pending.append(fd)
            let w = s.waiter
            s.waiter = nil
            return (w, false)
        }
        if refused { try? fd.close() }
        waiter?.resume()
    }

    func finish(throwing error: Errno? = nil) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if !s.finished {
                s.finished = true
                s.failure = error
            }
            s.stopped = true  // the loop let go of the listener: nothing to tell it
            onStop = nil
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    func next() async throws -> FileDescriptor? {
        while true {
            let (fd, finished, failure) = state.withLock { s -> (FileDescriptor?, Bool, Errno?) in
                if !s.pending.isEmpty { return (s.pending.removeFirst(), false, nil) }
                let f = s.failure
                s.failure = nil
                return (nil, s.finished, f)
            }
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
            return (left, notify)
        }
        for fd in left { try? fd.close() }
        notify?()
    }
}
