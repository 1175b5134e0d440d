import SystemPackage

// The loop's portable backend: POSIX poll(2) readiness, then the syscall a request stands for
// (a non-blocking read(2)/recv(2), sendmsg(2), accept(2)), reported as the completion that
// request would have had, exactly as EpollLoopBackend does it (a send is tried at once and
// waits for POLLOUT only when the socket is full). Where epoll and io_uring are missing (macOS,
// the BSDs) it is the loop's only backend; on Linux it is chosen with
// `IOLoop.Options.events = .poll` (or EXACTIO_EVENTS=poll), so that CI runs it here.
//
// Differences from epoll, all inside this file: the interest set is a table of descriptors
// (the loop's own duplicates, so a number names one connection or listener at a time) that is
// turned into the `pollfd` array again only when it changed since the last turn, and every
// turn costs O(descriptors watched) in the kernel (poll's nature: a loop of this kind is for
// development machines and modest connection counts; Linux servers use io_uring or epoll).
// The per-connection state (what the descriptor is watched for, a receive armed, a large read
// waiting for readiness, memory of its own, non-blocking set) is the same
// `LoopConnection.KernelState` fields epoll keeps; a send waiting for room is the sender's.

final class PollLoopBackend: LoopBackend {
    let waker: Waker
    let pool: ReceivePool
    /// The watched descriptors: each one's tag (token and what it is watched for) and poll
    /// events (POLLIN for a receive, a large read or accepts; POLLOUT for a send waiting for room).
    private var watched: [Int32: Watch] = [:]
    private struct Watch: Equatable {
        var tag: UInt64
        var events: Int16
    }
    /// `watched` as poll(2) takes it, the waker first; rebuilt when `watched` changed.
    private var fds: [pollfd] = []
    private var tags: [UInt64] = []
    private var watchedChanged = true
    /// Receive buffers not in use, and the one being filled (with its fill offset).
    private var free: [UInt16]
    private var current: ReceiveBuffer? = nil
    private var currentOffset = 0
    /// Completions made without the kernel (cancellations), reported at the next turn.
    private var synthetic: [LoopCompletion] = []
    private var counters = LoopCounters()

    static let wakeTag = LoopTag(loopOwn: .wake).rawValue

    init(pool: ReceivePool, waker: Waker) {
        self.waker = waker
        self.pool = pool
        self.free = (0..<UInt16(pool.count)).reversed()
    }

    var kind: ExactReader.Backend { .posix }
    var limitsReceives: Bool { false }
    var inFlight: Int { synthetic.count }

    func close() {
        current = nil
        watched.removeAll()
        fds.removeAll()
        tags.removeAll()
    }

    // MARK: Interest

    /// What the connection's descriptor is watched for on the reading side (nil: nothing),
    /// combined with its send waiting for room (POLLOUT): one entry per descriptor. With
    /// neither, it leaves the table: poll(2) reports POLLHUP and POLLERR whatever `events`
    /// says, and a closed peer would end every wait.
    private func setInterest(_ c: LoopConnection, _ kind: LoopTag.Kind?) {
        c.kernel.epollInterest = kind
        let sending = c.sender?.kernel.pending != nil
        guard kind != nil || sending else {
            if c.kernel.epollRegistered {
                watched[c.fd.rawValue] = nil
                c.kernel.epollRegistered = false
                watchedChanged = true
            }
            return
        }
        let watch = Watch(
            tag: c.tag(kind ?? .send),
            events: (kind != nil ? Int16(POLLIN) : 0) | (sending ? Int16(POLLOUT) : 0))
        if watched[c.fd.rawValue] != watch {
            watched[c.fd.rawValue] = watch
            watchedChanged = true
        }
        c.kernel.epollRegistered = true
    }

    /// Reads on the loop never block: sockets are read with MSG_DONTWAIT (the descriptor's own
    /// mode, which the caller may rely on for its writes, is left alone); other descriptors
    /// (pipes, FIFOs, terminals) are set non-blocking once.
    private func prepare(_ c: LoopConnection) {
        guard !c.isSocket, !c.kernel.nonBlockingSet else { return }
        c.kernel.nonBlockingSet = true
        Platform.setNonBlocking(c.fd.rawValue)
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
            // Each read at most the limit, as on epoll: after a large frame only its next
            // prefix, not the start of the next body.
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
    /// nil when the socket has no room (EAGAIN: wait for POLLOUT).
    private func sendNow(_ c: LoopConnection, _ iov: UnsafeBufferPointer<iovec>) -> LoopCompletion? {
        guard let s = c.sender else { return nil }
        counters.sends += 1
        s.msg.pointee = msghdr()
        s.msg.pointee.msg_iov = UnsafeMutablePointer(mutating: iov.baseAddress)
        s.msg.pointee.msg_iovlen = numericCast(iov.count)
        while true {
            let n = Platform.sendNoSignal(c.fd.rawValue, s.msg)
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
            Platform.setNonBlocking(l.fd.rawValue)
            watched[l.fd.rawValue] = Watch(tag: LoopTag(l.token, .accept).rawValue, events: Int16(POLLIN))
            watchedChanged = true
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
            watched[l.fd.rawValue] = nil
            watchedChanged = true
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
        if watchedChanged { rebuild() }
        counters.enters += 1
        let n = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeoutMs) }
        if n < 0 {
            // EINTR is a passing end of the wait; anything else (EFAULT, EINVAL: more descriptors
            // than RLIMIT_NOFILE, ENOMEM) is the interface failing.
            return errno == EINTR ? nil : Errno(rawValue: errno)
        }
        counters.completions += Int(n)
        var left = Int(n)
        // The arrays as they were for this wait: handling an event may change `watched` (a
        // receive that ends leaves it), which takes effect at the next turn.
        for i in fds.indices where left > 0 && fds[i].revents != 0 {
            left -= 1
            let raw = tags[i]
            if raw == Self.wakeTag {
                waker.drain()
                continue
            }
            let tag = LoopTag(rawValue: raw)
            switch resolve(tag.token) {
            case .connection(let c)?:
                let ready = fds[i].revents
                let hangup = ready & Int16(POLLERR | POLLHUP | POLLNVAL) != 0
                if c.sender?.kernel.pending != nil && (ready & Int16(POLLOUT) != 0 || hangup) {
                    sendReady(c, &completions)
                }
                guard ready & Int16(POLLIN) != 0 || hangup else { continue }
                switch c.kernel.epollInterest {
                case .receive?: receive(c, &completions)
                case .read?: readInto(c, &completions)
                default:
                    setInterest(c, nil)  // nothing asked for any more (a send keeps POLLOUT)
                    if !c.kernel.epollRegistered { unwatch(fds[i].fd, ifStill: raw) }
                }
            case .listener(let l)?:
                acceptReady(l, &completions)
            case nil:
                unwatch(fds[i].fd, ifStill: raw)
            }
        }
        return nil
    }

    /// Stops watching `fd` if it is still watched for `tag`: a watch nobody owns any more
    /// (epoll drops a closed descriptor from its set by itself; poll(2) would report it as
    /// POLLNVAL at every turn, a loop that never sleeps).
    private func unwatch(_ fd: Int32, ifStill tag: UInt64) {
        if watched[fd]?.tag == tag {
            watched[fd] = nil
            watchedChanged = true
        }
    }

    /// The `pollfd` array for `watched`, the waker first.
    private func rebuild() {
        watchedChanged = false
        fds.removeAll(keepingCapacity: true)
        tags.removeAll(keepingCapacity: true)
        fds.append(pollfd(fd: waker.descriptor, events: Int16(POLLIN), revents: 0))
        tags.append(Self.wakeTag)
        for (fd, watch) in watched {
            fds.append(pollfd(fd: fd, events: watch.events, revents: 0))
            tags.append(watch.tag)
        }
    }

    /// Readiness for a connection that receives: one read, into its own memory if the receive
    /// targets it, else into the receive buffer being filled.
    private func receive(_ c: LoopConnection, _ out: inout [LoopCompletion]) {
        guard c.kernel.receiveArmed else {
            setInterest(c, nil)  // left watched after a single-shot receive; nothing asked
            return
        }
        if let own = c.kernel.ownTarget {
            let n = readNow(c, own.region.base + own.offset, own.count)
            if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
            c.kernel.ownTarget = nil
            c.kernel.receiveArmed = false
            if n > 0 {
                // Single-shot; the descriptor stays watched for the next one (the machine
                // usually asks for it at once; a readiness with nothing asked removes it).
                out.append(.received(c, .own(own.region, start: own.offset, count: n), .done))
            } else {
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
    /// stays watched for the next part (the machine usually asks for it at once).
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
            let fd = Platform.acceptNonBlocking(l.fd.rawValue)
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
