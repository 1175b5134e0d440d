import SystemPackage

// The send side of the loop's decisions (`AsyncExactWriter`), written once for every backend:
// a write goes out in sends of what is left of it until the kernel took every byte; a large
// enough view goes zero-copy where the backend can and the socket lets it (a refusal sends the
// same bytes again, copying, and the socket stays with copying); a zero-copy send's views are
// held until its notification, never just its completion; a cancel or a deadline ends the send
// in flight, and the write reports what went (nothing is sent twice: only what the kernel did
// not take is sent again); the writer leaving, shutdown and failure.

extension LoopMachine {
    /// Bytes at most per send (io_uring's send length is 32 bits; the kernel takes at most
    /// 2 GiB - 4 KiB per call anyway).
    static var sendLimit: Int { 1 << 30 }
    /// iovecs at most per send (IOV_MAX).
    static var iovLimit: Int { 1024 }

    // MARK: - Commands

    /// The writer published a request (`LoopSender.Shared.request`): send it.
    func startSend(_ c: LoopConnection) {
        guard let s = c.sender else { return }
        if stopping {
            finishRequest(s, error: .canceled, shutDown: true)
            return
        }
        attach(c)
        watchSend(c)
        guard s.phase == .idle else { return }
        sendMore(c, s)
    }

    /// The writer asks to end its send early (its task was cancelled, its deadline passed).
    func cancelSend(_ c: LoopConnection) {
        guard let s = c.sender, s.phase == .inFlight else { return }
        s.phase = .canceling
        backend.cancelSend(c)
    }

    /// The writer is gone: the connection leaves once its reader is gone too (or it had none)
    /// and nothing of it is in the kernel.
    func detachSender(_ c: LoopConnection) {
        guard let s = c.sender else { return }
        s.gone = true
        cancelSend(c)
        guard c.detached else { return }
        if c.token.isAttached {
            releaseIfIdle(c)
        } else {
            c.fd.close()  // never attached: nothing of it is in the kernel
            s.released()
        }
    }

    /// `IOLoop.withConnection` ends: the reader's and the writer's requests end, and the loop
    /// closes its descriptor as soon as the kernel has none of them (`k` is resumed then).
    func closeConnection(_ c: LoopConnection, _ k: CheckedContinuation<Void, Never>) {
        guard let s = c.sender else {
            k.resume()
            return
        }
        s.onRelease = k
        handle(.detach(c))
        detachSender(c)
    }

    /// Watches the writer's deadline (one timer per writer at a time, as for readers).
    func watchSend(_ c: LoopConnection) {
        guard let s = c.sender else { return }
        let d = s.shared.withLock { $0.deadline }
        guard d > 0, s.timerAt == 0 || d < s.timerAt else { return }
        s.timerAt = d
        timers.insert(d, .sendDeadline(c))
    }

    /// A writer's timer fired at `when`.
    func sendTimerFired(_ c: LoopConnection, when: Int64, now: Int64) {
        guard let s = c.sender, s.timerAt == when else { return }  // stale: a later one replaced it
        s.timerAt = 0
        if s.gone { return }
        switch s.expire(now: now) {
        case .none:
            break
        case .pending(let later):
            s.timerAt = later
            timers.insert(later, .sendDeadline(c))
        case .expired:
            cancelSend(c)
        }
    }

    // MARK: - Sending

    /// Sends what is left of the request: its views from `sent` on, gathered (at most
    /// `iovLimit` pieces and `sendLimit` bytes at a time). Zero-copy when the writer allows it
    /// for these views, the backend has it, this socket has not refused it, and a piece is at
    /// least the writer's zero-copy minimum (small pieces pinned one by one cost more than
    /// their copy).
    private func sendMore(_ c: LoopConnection, _ s: LoopSender) {
        guard let r = s.shared.withLock({ $0.request }), !r.done else { return }
        let iov = s.iovecs(min(r.views.count, Self.iovLimit))
        var count = 0
        var bytes = 0
        var largest = 0
        var skip = r.sent
        for v in r.views {
            if skip >= v.count {
                skip -= v.count
                continue
            }
            if count == Self.iovLimit || bytes == Self.sendLimit { break }
            let n = min(v.count - skip, Self.sendLimit - bytes)
            // The iovec points into the view's memory, which `inFlightViews` keeps alive until
            // the completion; the kernel only reads it.
            iov[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: v.storage.baseAddress! + skip), iov_len: n)
            count += 1
            bytes += n
            largest = max(largest, n)
            skip = 0
        }
        guard count > 0 else {
            finishRequest(s, error: nil)  // nothing left (cannot happen: `sent` < `total`)
            return
        }
        let zeroCopy = r.zeroCopyAllowed && backend.supportsZeroCopy && !s.zeroCopyRefused && c.isSocket
            && largest >= s.zeroCopyMinimum
        s.nextID &+= 1
        if let e = backend.send(c, UnsafeBufferPointer(start: iov, count: count), zeroCopy: zeroCopy, id: s.nextID) {
            finishRequest(s, error: e)
            return
        }
        s.phase = .inFlight
        s.inFlightID = s.nextID
        s.inFlightZeroCopy = zeroCopy
        s.inFlightViews = r.views
    }

    /// A send completed: progress, the rest, a refused zero-copy send again copying, or the
    /// request's end. A zero-copy send's views stay held until its notification.
    func sendCompleted(_ c: LoopConnection, count n: Int, error: Errno?, notification: Bool) {
        guard let s = c.sender else { return }
        let canceling = s.phase == .canceling
        s.phase = .idle
        let views = s.inFlightViews
        s.inFlightViews = []
        let zeroCopy = s.inFlightZeroCopy
        let took = max(n, 0)
        if zeroCopy && notification {
            s.held[s.inFlightID] = (views, took)
            holdingSenders[ObjectIdentifier(c)] = c
        }
        // EOPNOTSUPP: a socket that cannot send zero-copy (AF_UNIX); EINVAL: a kernel that
        // refuses it. Nothing was sent: the same bytes go again, copying.
        let refused = zeroCopy && took == 0 && !canceling && !stopping && !s.gone
            && (error == .notSupportedOnSocket || error == .notSupported || error == .invalidArgument)
        if refused { s.zeroCopyRefused = true }
        let waiter = s.shared.withLock { sh -> CheckedContinuation<Void, Never>? in
            if zeroCopy && notification {
                sh.pinned += took
                sh.notificationsPending += 1
            }
            guard var r = sh.request, !r.done else { return nil }
            r.sends += 1
            r.sent += took
            if zeroCopy { r.sentZeroCopy += took }
            if refused { r.refusals += 1 }
            if r.sent >= r.total {
                r.done = true
            } else if let error, !refused {
                r.done = true
                r.error = error
            } else if canceling || stopping || s.gone || sh.timedOut {
                r.done = true
                r.error = .canceled
            } else if took == 0 && !refused {
                // A send that took nothing without an error (a stream socket never does this
                // for a non-empty send): an error rather than a loop that spins.
                r.done = true
                r.error = .ioError
            }
            sh.request = r
            guard r.done else { return nil }
            let w = sh.waiter
            sh.waiter = nil
            return w
        }
        if let waiter {
            waiter.resume()
        } else if !canceling {
            sendMore(c, s)
        }
        if c.detached { releaseIfIdle(c) }
    }

    /// The kernel let go of a zero-copy send's memory: its views are released, and a writer
    /// waiting for room (its bound) may go on.
    func sendReleased(_ c: LoopConnection, id: UInt32) {
        guard let s = c.sender, let h = s.held.removeValue(forKey: id) else { return }
        if s.held.isEmpty { holdingSenders[ObjectIdentifier(c)] = nil }
        s.wake { sh in
            sh.pinned -= h.bytes
            sh.notificationsPending -= 1
        }
        _ = h  // the views go here, on the loop's thread
    }

    /// Ends the writer's request (if it has one in progress) with `error` and wakes it.
    func finishRequest(_ s: LoopSender, error: Errno?, shutDown: Bool = false) {
        s.wake { sh in
            if shutDown { sh.shutDown = true }
            guard sh.request != nil, !sh.request!.done else { return }
            sh.request!.done = true
            sh.request!.error = error
        }
    }

    // MARK: - Shutdown and failure

    /// At shutdown: the writer is told, and its send in flight ends.
    func stopSending(_ c: LoopConnection) {
        guard let s = c.sender else { return }
        s.wake { $0.shutDown = true }
        cancelSend(c)
    }

    /// The kernel interface failed for good: the writer's request fails with `error`; views
    /// the kernel may still read are kept forever (`zeroCopyQuarantine`).
    func failSending(_ c: LoopConnection, _ error: Errno) {
        guard let s = c.sender else { return }
        s.phase = .idle
        s.inFlightViews = []
        s.wake { sh in
            sh.failure = error
            if sh.request != nil && !sh.request!.done {
                sh.request!.done = true
                sh.request!.error = error
            }
        }
    }

    /// Held views whose notification has not come when the ring goes (shutdown, failure): the
    /// kernel may still read them, so they are never released.
    func quarantineHeldViews() {
        for c in holdingSenders.values {
            guard let s = c.sender, !s.held.isEmpty else { continue }
            let views = s.held.values.map(\.views)
            zeroCopyQuarantine.withLock { $0.append(contentsOf: views) }
            s.held.removeAll()
        }
        holdingSenders.removeAll()
    }

    /// `command` after a failure (`answerFailed`), for the send-side commands.
    func answerFailedSend(_ command: LoopCommand, _ error: Errno) {
        switch command {
        case .send(let c):
            if let s = c.sender { finishRequest(s, error: error) }
        case .detachSender(let c):
            guard let s = c.sender else { return }
            s.gone = true
            if c.detached && !c.token.isAttached {
                c.fd.close()
                s.released()
            }
        case .closeConnection(let c, let k):
            c.detached = true
            c.sender?.gone = true
            c.fd.close()  // the kernel interface is not used again
            k.resume()
        default:
            break
        }
    }

    /// The writer's state, for `describe`.
    func describeSender(_ c: LoopConnection) -> String {
        guard let s = c.sender else { return "" }
        let sh = s.shared.withLock { sh in
            "request \(sh.request.map { "\($0.sent)/\($0.total) done \($0.done)" } ?? "-") pinned \(sh.pinned) waiter \(sh.waiter != nil)"
        }
        return "; send \(s.phase) gone \(s.gone) held \(s.held.count) refused \(s.zeroCopyRefused) \(sh)"
    }
}
