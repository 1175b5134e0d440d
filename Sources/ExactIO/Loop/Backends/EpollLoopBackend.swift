#if os(Linux)
import CExactIOLinux
import SystemPackage

// The loop's epoll backend, where io_uring is unavailable: level-triggered readiness, then
// the syscall a request stands for (a non-blocking read(2)/recv(2), sendmsg(2), accept4(2)),
// reported as the completion that request would have had. Received bytes are packed into the
// loop's receive buffers, one buffer filled across connections. A send is tried at once and
// waits for EPOLLOUT only when the socket is full; a connection's descriptor is in the epoll set
// once, for EPOLLIN (its receive or large read) and EPOLLOUT (its send) combined. Cancellations
// complete at once, as completions of their own, at the next turn.

final class EpollLoopBackend: LoopBackend {
    let epfd: Int32
    let waker: Waker
    let pool: ReceivePool
    private var events: [epoll_event]
    /// Receive buffers not in use, and the one being filled (with its fill offset).
    private var free: [UInt16]
    private var current: ReceiveBuffer? = nil
    private var currentOffset = 0
    /// Completions made without the kernel (cancellations), reported at the next turn.
    private var synthetic: [LoopCompletion] = []
    private var counters = LoopCounters()

    static let wakeTag = LoopTag(loopOwn: .wake).rawValue

    init(pool: ReceivePool, waker: Waker) throws(Errno) {
        let fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        self.epfd = fd
        self.waker = waker
        self.pool = pool
        self.events = Array(repeating: epoll_event(), count: 256)
        self.free = (0..<UInt16(pool.count)).reversed()
        var ev = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: Self.wakeTag))
        guard epoll_ctl(epfd, EPOLL_CTL_ADD, waker.descriptor, &ev) == 0 else {
            let e = Errno(rawValue: errno)
            _ = posixClose(fd)
            throw e
        }
    }

    var kind: ExactReader.Backend { .posix }
    var limitsReceives: Bool { false }
    var inFlight: Int { synthetic.count }

    func close() {
        current = nil
        _ = posixClose(epfd)
    }

    // MARK: Interest

    /// What the connection's descriptor is in the epoll set for on the reading side (nil:
    /// nothing), combined with its send waiting for room (EPOLLOUT): one registration per
    /// descriptor. With neither, it leaves the set: EPOLLHUP and EPOLLERR are reported even
    /// for an empty event mask, and a closed peer would wake every turn.
    private func setInterest(_ c: LoopConnection, _ kind: LoopTag.Kind?) {
        c.kernel.epollInterest = kind
        let sending = c.sender?.kernel.pending != nil
        guard kind != nil || sending else {
            if c.kernel.epollRegistered {
                _ = epoll_ctl(epfd, EPOLL_CTL_DEL, c.fd.rawValue, nil)
                c.kernel.epollRegistered = false
            }
            return
        }
        let events = (kind != nil ? EPOLLIN.rawValue : 0) | (sending ? EPOLLOUT.rawValue : 0)
        var ev = epoll_event(events: events, data: epoll_data_t(u64: c.tag(kind ?? .send)))
        if c.kernel.epollRegistered {
            _ = epoll_ctl(epfd, EPOLL_CTL_MOD, c.fd.rawValue, &ev)
        } else if epoll_ctl(epfd, EPOLL_CTL_ADD, c.fd.rawValue, &ev) == 0 {
            c.kernel.epollRegistered = true
        }
    }

    /// Reads on the loop never block: sockets are read with MSG_DONTWAIT (the descriptor's own
    /// mode, which the caller may rely on for its writes, is left alone); other descriptors
    /// (pipes, FIFOs, terminals) are set non-blocking once. A spurious readiness then costs an
    /// EAGAIN, never the whole loop.
    private func prepare(_ c: LoopConnection) {
        guard !c.isSocket, !c.kernel.nonBlockingSet else { return }
        c.kernel.nonBlockingSet = true
        let flags = fcntl(c.fd.rawValue, F_GETFL)
        if flags >= 0 && flags & O_NONBLOCK == 0 { _ = fcntl(c.fd.rawValue, F_SETFL, flags | O_NONBLOCK) }
    }

    /// One non-blocking read of the connection into `buffer`.
    private func readNow(_ c: LoopConnection, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Int {
        counters.reads += 1
        return c.isSocket
            ? recv(c.fd.rawValue, buffer, count, Int32(MSG_DONTWAIT))
            : posixRead(c.fd.rawValue, buffer, count)
    }

    // MARK: Operations

    func armReceive(_ c: LoopConnection, _ target: ReceiveTarget) -> Errno? {
        prepare(c)
        if case .own(let region, let offset, let count) = target {
            c.kernel.ownTarget = (region, offset, count)
            c.kernel.receiveLimit = 0
        } else if case .shared(let limit) = target {
            c.kernel.ownTarget = nil
            // Each read at most the limit (the machine stops the receive once the reader has
            // enough): after a large frame only its next prefix, not the start of the next body.
            c.kernel.receiveLimit = UInt32(clamping: max(limit, 0))
        }
        c.kernel.receiveArmed = true
        if c.kernel.epollInterest != .receive { setInterest(c, .receive) }
        return nil
    }

    func disarmReceive(_ c: LoopConnection) {
        guard c.kernel.receiveArmed else { return }
        c.kernel.receiveArmed = false
        setInterest(c, nil)
        c.kernel.ownTarget = nil
        synthetic.append(.received(c, nil, .canceled))
    }

    func read(_ c: LoopConnection, into dst: UnsafeMutableRawBufferPointer, slot: Int32) -> Errno? {
        prepare(c)
        c.kernel.pendingRead = (dst, slot)
        if c.kernel.epollInterest != .read { setInterest(c, .read) }
        return nil
    }

    func cancelRead(_ c: LoopConnection) {
        guard c.kernel.pendingRead != nil else { return }
        c.kernel.pendingRead = nil
        setInterest(c, nil)
        synthetic.append(.read(c, count: 0, error: .canceled))
    }

    func forget(_ c: LoopConnection) {
        if !c.kernel.receiveArmed && c.kernel.pendingRead == nil { setInterest(c, nil) }
    }

    // MARK: Sending

    var supportsZeroCopy: Bool { false }

    func send(_ c: LoopConnection, _ iov: UnsafeBufferPointer<iovec>, zeroCopy: Bool, id: UInt32) -> Errno? {
        guard let s = c.sender else { return .invalidArgument }
        // Tried at once (a socket usually has room); reported at the next turn, as a completion.
        if let done = sendNow(c, iov) {
            synthetic.append(done)
            return nil
        }
        s.kernel.pending = iov
        setInterest(c, c.kernel.epollInterest)
        return nil
    }

    /// One sendmsg(2) of `iov`, never blocking and never raising SIGPIPE: its completion, or
    /// nil when the socket has no room (EAGAIN: wait for EPOLLOUT).
    private func sendNow(_ c: LoopConnection, _ iov: UnsafeBufferPointer<iovec>) -> LoopCompletion? {
        guard let s = c.sender else { return nil }
        counters.sends += 1
        s.msg.pointee = msghdr()
        s.msg.pointee.msg_iov = UnsafeMutablePointer(mutating: iov.baseAddress)
        s.msg.pointee.msg_iovlen = iov.count
        while true {
            let n = sendmsg(c.fd.rawValue, s.msg, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n >= 0 { return .sent(c, count: n, error: nil, notification: false) }
            switch errno {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return nil
            default: return .sent(c, count: 0, error: Errno(rawValue: errno), notification: false)
            }
        }
    }

    func cancelSend(_ c: LoopConnection) {
        guard let s = c.sender, s.kernel.pending != nil else { return }
        s.kernel.pending = nil
        setInterest(c, c.kernel.epollInterest)
        synthetic.append(.sent(c, count: 0, error: .canceled, notification: false))
    }

    /// Readiness for a send waiting for room: tried again.
    private func sendReady(_ c: LoopConnection, _ out: inout [LoopCompletion]) {
        guard let s = c.sender, let iov = s.kernel.pending, let done = sendNow(c, iov) else { return }
        s.kernel.pending = nil
        setInterest(c, c.kernel.epollInterest)
        out.append(done)
    }

    func holdNotifications(_ hold: Bool) {}
    func refuseZeroCopy() {}

    func accept(_ l: Listener, count: Int) -> (armed: Int, error: Errno?) {
        if !l.kernel.epollRegistered {
            let flags = fcntl(l.fd.rawValue, F_GETFL)
            _ = fcntl(l.fd.rawValue, F_SETFL, flags | O_NONBLOCK)
            var ev = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: LoopTag(l.token, .accept).rawValue))
            guard epoll_ctl(epfd, EPOLL_CTL_ADD, l.fd.rawValue, &ev) == 0 else { return (0, Errno(rawValue: errno)) }
            l.kernel.epollRegistered = true
        }
        l.kernel.acceptBudget += count
        return (count, nil)
    }

    func cancelAccepts(_ l: Listener) {
        for _ in 0..<l.kernel.acceptBudget { synthetic.append(.accepted(l, .failure(.canceled))) }
        l.kernel.acceptBudget = 0
        stopWatching(l)
    }

    private func stopWatching(_ l: Listener) {
        if l.kernel.epollRegistered {
            _ = epoll_ctl(epfd, EPOLL_CTL_DEL, l.fd.rawValue, nil)
            l.kernel.epollRegistered = false
        }
    }

    func giveBack(_ bids: [UInt16]) {
        free.append(contentsOf: bids)
    }

    func cancelAll() {}

    func injectWaitFailures(count: Int, errno: Int32) {}

    func takeCounters() -> LoopCounters {
        defer { counters = LoopCounters() }
        return counters
    }

    // MARK: The turn

    func turn(timeout: Int64?, resolve: (LoopToken) -> LoopEntry?, into completions: inout [LoopCompletion]) -> Errno? {
        completions.append(contentsOf: synthetic)
        synthetic.removeAll(keepingCapacity: true)
        var timeoutMs: Int32 = -1
        if let timeout { timeoutMs = Int32(clamping: (timeout + 999_999) / 1_000_000) }
        if !completions.isEmpty { timeoutMs = 0 }
        counters.enters += 1
        let n = events.withUnsafeMutableBufferPointer { epoll_wait(epfd, $0.baseAddress, Int32($0.count), timeoutMs) }
        if n < 0 {
            // EINTR is a passing end of the wait; anything else (EBADF, EFAULT, EINVAL) is the
            // epoll set failing.
            return errno == EINTR ? nil : Errno(rawValue: errno)
        }
        counters.completions += Int(n)
        for i in 0..<Int(n) {
            let raw = events[i].data.u64
            if raw == Self.wakeTag {
                waker.drain()
                continue
            }
            let tag = LoopTag(rawValue: raw)
            switch resolve(tag.token) {
            case .connection(let c)?:
                let ready = events[i].events
                let hangup = ready & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0
                if c.sender?.kernel.pending != nil && (ready & EPOLLOUT.rawValue != 0 || hangup) {
                    sendReady(c, &completions)
                }
                guard ready & EPOLLIN.rawValue != 0 || hangup else { continue }
                switch c.kernel.epollInterest {
                case .receive?: receive(c, &completions)
                case .read?: readInto(c, &completions)
                default: setInterest(c, nil)  // nothing asked for any more (a send keeps EPOLLOUT)
                }
            case .listener(let l)?:
                acceptReady(l, &completions)
            case nil:
                break
            }
        }
        return nil
    }

    /// Readiness for a connection that receives: one read, into its own memory if the receive
    /// targets it, else into the receive buffer being filled.
    private func receive(_ c: LoopConnection, _ out: inout [LoopCompletion]) {
        guard c.kernel.receiveArmed else {
            setInterest(c, nil)  // left in the set after a single-shot receive; nothing asked
            return
        }
        if let own = c.kernel.ownTarget {
            let n = readNow(c, own.region.base + own.offset, own.count)
            if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
            c.kernel.ownTarget = nil
            if n > 0 {
                // Single-shot; the descriptor stays in the epoll set for the next one (the
                // machine usually asks for it at once; a readiness with nothing asked removes it).
                c.kernel.receiveArmed = false
                out.append(.received(c, .own(own.region, start: own.offset, count: n), .done))
            } else {
                c.kernel.receiveArmed = false
                setInterest(c, nil)
                out.append(ended(c, n))
            }
            return
        }
        if current == nil || pool.size - currentOffset < 512 {
            guard let bid = free.popLast() else {
                c.kernel.receiveArmed = false
                setInterest(c, nil)
                out.append(.received(c, nil, .noBuffers))
                return
            }
            current = ReceiveBuffer(pool: pool, bid: bid)
            currentOffset = 0
        }
        let buffer = current!
        let room = pool.size - currentOffset
        let n = readNow(c, buffer.base + currentOffset, c.kernel.receiveLimit > 0 ? min(room, Int(c.kernel.receiveLimit)) : room)
        if n > 0 {
            out.append(.received(c, .shared(Segment(owner: buffer, base: buffer.base, start: currentOffset, end: currentOffset + n)), .more))
            currentOffset += n
            return
        }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        c.kernel.receiveArmed = false
        setInterest(c, nil)
        out.append(ended(c, n))
    }

    /// The completion of a receive whose read returned `n` ≤ 0 (with errno set for < 0).
    private func ended(_ c: LoopConnection, _ n: Int) -> LoopCompletion {
        .received(c, nil, n == 0 ? .endOfStream : .failed(Errno(rawValue: errno)))
    }

    /// Readiness for a large read: one read straight into the body's memory. The descriptor
    /// stays in the epoll set for the next part (the machine usually asks for it at once).
    private func readInto(_ c: LoopConnection, _ out: inout [LoopCompletion]) {
        guard let (dst, _) = c.kernel.pendingRead else {
            setInterest(c, nil)
            return
        }
        let n = readNow(c, dst.baseAddress!, dst.count)
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        c.kernel.pendingRead = nil
        out.append(.read(c, count: max(n, 0), error: n < 0 ? Errno(rawValue: errno) : nil))
    }

    /// Readiness for a listener: accepts while it has budget and connections wait.
    private func acceptReady(_ l: Listener, _ out: inout [LoopCompletion]) {
        while l.kernel.acceptBudget > 0 {
            let fd = cexactio_accept4(l.fd.rawValue, Int32(SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue))
            if fd >= 0 {
                l.kernel.acceptBudget -= 1
                out.append(.accepted(l, .success(fd)))
                continue
            }
            let e = Errno(rawValue: errno)
            if e == .resourceTemporarilyUnavailable || e == .interrupted { return }
            if e == .connectionAbort { continue }
            // Every accept asked for ends with this (a shortage pauses accepting; the machine
            // decides).
            for _ in 0..<l.kernel.acceptBudget { out.append(.accepted(l, .failure(e))) }
            l.kernel.acceptBudget = 0
        }
        stopWatching(l)
    }
}
#endif
