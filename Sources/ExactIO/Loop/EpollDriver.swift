import CExactIOLinux
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage

/// The loop on epoll with non-blocking `read(2)`, where io_uring is unavailable: level-
/// triggered readiness for the connections that want bytes, one `read(2)` per ready
/// connection per turn (fairness), received bytes packed into the loop's receive buffers.
final class EpollDriver: LoopDriverBase, LoopDriver {
    let epfd: Int32
    let waker: Waker
    private var events: [epoll_event]
    /// Receive buffers not in use, and the one being filled (with its fill offset).
    private var free: [UInt16]
    private var current: ReceiveBuffer? = nil
    private var currentOffset = 0
    private var inflight = 0

    static let wakeTag: UInt64 = LoopTag(slot: 0xff_ffff, generation: 0, kind: .wake).rawValue

    init(pool: ReceivePool, waker: Waker) throws(Errno) {
        let fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        self.epfd = fd
        self.waker = waker
        self.events = Array(repeating: epoll_event(), count: 256)
        self.free = (0..<UInt16(pool.count)).reversed()
        super.init(pool: pool)
        var ev = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: EpollDriver.wakeTag))
        guard epoll_ctl(epfd, EPOLL_CTL_ADD, waker.descriptor, &ev) == 0 else {
            let e = Errno(rawValue: errno)
            posixClose(fd)
            throw e
        }
    }

    var kind: ExactReader.Backend { .posix }

    func close() {
        posixClose(epfd)
    }

    /// Reading interest on or off. Off is a removal: EPOLLHUP and EPOLLERR are reported even
    /// for an empty event mask, and a closed peer would wake every turn.
    private func setInterest(_ fd: Int32, tag: UInt64, reading: Bool, registered: inout Bool) {
        if !reading {
            if registered {
                _ = epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nil)
                registered = false
            }
            return
        }
        var ev = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: tag))
        if registered {
            _ = epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev)
        } else if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) == 0 {
            registered = true
        }
    }

    // MARK: Receiving

    override func startReceive(_ c: LoopConnection, loop: IOLoop) {
        prepare(c)
        c.armed = true
        c.state.withLock { $0.receiving = true }
        setInterest(c.fd.rawValue, tag: c.tag(.receive), reading: true, registered: &c.registeredWithEpoll)
    }

    override func stopReceive(_ c: LoopConnection) {
        c.armed = false
        setInterest(c.fd.rawValue, tag: c.tag(.receive), reading: false, registered: &c.registeredWithEpoll)
        c.receivingStopped()
        if c.directPending && !c.detached {
            c.directPending = false
            startDirectNow(c)
        }
    }

    override func startDirect(_ c: LoopConnection, loop: IOLoop) {
        startDirectNow(c)
    }

    /// Reads on the loop never block: sockets are read with MSG_DONTWAIT (the descriptor's own
    /// mode, which the caller may rely on for its writes, is left alone); other descriptors
    /// (pipes, FIFOs, terminals) are set non-blocking once. A spurious readiness then costs
    /// an EAGAIN, never the whole loop.
    private func prepare(_ c: LoopConnection) {
        guard !c.isSocket, !c.nonBlockingSet else { return }
        c.nonBlockingSet = true
        let flags = fcntl(c.fd.rawValue, F_GETFL)
        if flags >= 0 && flags & O_NONBLOCK == 0 { _ = fcntl(c.fd.rawValue, F_SETFL, flags | O_NONBLOCK) }
    }

    /// One non-blocking read of the connection into `buffer`.
    private func read(_ c: LoopConnection, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Int {
        c.isSocket ? recv(c.fd.rawValue, buffer, count, Int32(MSG_DONTWAIT)) : posixRead(c.fd.rawValue, buffer, count)
    }

    private func startDirectNow(_ c: LoopConnection) {
        prepare(c)
        // As for io_uring: what the receive met first (bytes, a reset, the end) comes first.
        if c.state.withLock({ $0.hasNews }) {
            c.directProgress(0, finished: true, error: nil, retry: true)
            return
        }
        c.directInFlight = true
        setInterest(c.fd.rawValue, tag: c.tag(.direct), reading: true, registered: &c.registeredWithEpoll)
    }

    override func cancelDirect(_ c: LoopConnection) {
        guard c.directInFlight else { return }
        c.directInFlight = false
        setInterest(c.fd.rawValue, tag: c.tag(.direct), reading: false, registered: &c.registeredWithEpoll)
        c.directProgress(0, finished: true, error: .canceled)
        releaseIfIdle(c)
    }

    override func detachKernel(_ c: LoopConnection) {
        if c.registeredWithEpoll {
            _ = epoll_ctl(epfd, EPOLL_CTL_DEL, c.fd.rawValue, nil)
            c.registeredWithEpoll = false
        }
        c.armed = false
    }

    /// One read(2) for a connection that wants received bytes.
    private func receive(_ c: LoopConnection, loop: IOLoop) {
        if current == nil || pool.size - currentOffset < 512 {
            guard let bid = free.popLast() else {
                receiveIntoOwnMemory(c, loop: loop)
                return
            }
            current = ReceiveBuffer(pool: pool, bid: bid)
            currentOffset = 0
        }
        let buffer = current!
        loop.count { $0.reads += 1 }
        let n = read(c, buffer.base + currentOffset, pool.size - currentOffset)
        if n > 0 {
            let segment = Segment(owner: buffer, base: buffer.base, start: currentOffset, end: currentOffset + n)
            currentOffset += n
            delivered(c, segment)
        } else {
            readFailed(c, n)
        }
    }

    /// The pool is dry (views the application keeps hold every buffer, or a burst): this read
    /// goes to memory of its own, so that no connection ever waits for buffers that only its
    /// own progress would give back (a deadlock: readers waiting for frames, holding views of
    /// every buffer). Queued bytes of idle readers are moved out of the pool meanwhile.
    private func receiveIntoOwnMemory(_ c: LoopConnection, loop: IOLoop) {
        loop.count { $0.starvations += 1 }
        if !pool.starved.exchange(true, ordering: .acquiringAndReleasing) { evacuateQueues() }
        guard let region = try? Region.standalone(capacity: pool.size) else {
            // Not even that: stop reading this connection until buffers come back.
            c.armed = false
            setInterest(c.fd.rawValue, tag: c.tag(.receive), reading: false, registered: &c.registeredWithEpoll)
            if !c.starved {
                c.starved = true
                starved.append(c)
            }
            return
        }
        loop.count { $0.reads += 1 }
        let n = read(c, region.base, pool.size)
        if n > 0 {
            delivered(c, ownSegment(region, count: n))
        } else {
            readFailed(c, n)
        }
    }

    private func delivered(_ c: LoopConnection, _ segment: Segment) {
        if c.deliver(segment) || c.state.withLock({ $0.received.bytes >= $0.wanted }) {
            // Backpressure, or the reader has what it wants ahead: stop reading until the
            // reader takes its bytes.
            stopReceive(c)
        }
    }

    /// A receive read(2) returned `n` ≤ 0: the end, an error, or nothing yet.
    private func readFailed(_ c: LoopConnection, _ n: Int) {
        if n == 0 {
            c.armed = false
            setInterest(c.fd.rawValue, tag: c.tag(.receive), reading: false, registered: &c.registeredWithEpoll)
            c.finishReceiving(eof: true, error: nil)
            return
        }
        let e = Errno(rawValue: errno)
        if e == .resourceTemporarilyUnavailable || e == .interrupted { return }
        c.armed = false
        setInterest(c.fd.rawValue, tag: c.tag(.receive), reading: false, registered: &c.registeredWithEpoll)
        c.finishReceiving(eof: false, error: e)
    }

    /// One read(2) straight into a direct read's memory.
    private func readDirect(_ c: LoopConnection, loop: IOLoop) {
        guard let d = c.state.withLock({ $0.direct }), !d.done else {
            c.directInFlight = false
            return
        }
        loop.count { $0.reads += 1 }
        let n = read(c, d.dst.baseAddress! + d.got, d.dst.count - d.got)
        var finished = false
        var error: Errno? = nil
        if n > 0 {
            finished = d.got + n >= d.minimum
        } else if n == 0 {
            finished = true
        } else {
            let e = Errno(rawValue: errno)
            if e == .resourceTemporarilyUnavailable || e == .interrupted { return }
            finished = true
            error = e
        }
        if finished {
            c.directInFlight = false
            setInterest(c.fd.rawValue, tag: c.tag(.direct), reading: false, registered: &c.registeredWithEpoll)
        }
        c.directProgress(max(n, 0), finished: finished, error: error)
        releaseIfIdle(c)
    }

    func giveBack(_ bids: [UInt16], loop: IOLoop) {
        guard !bids.isEmpty else { return }
        free.append(contentsOf: bids)
        resumeStarved(loop: loop)
    }

    // MARK: Accepting

    override func startAccept(_ l: Listener, loop: IOLoop) {
        guard !l.armed else { return }
        let flags = fcntl(l.fd.rawValue, F_GETFL)
        _ = fcntl(l.fd.rawValue, F_SETFL, flags | O_NONBLOCK)
        var ev = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: l.tag))
        if epoll_ctl(epfd, EPOLL_CTL_ADD, l.fd.rawValue, &ev) == 0 {
            l.armed = true
        } else {
            l.queue.finish(throwing: Errno(rawValue: errno))
            release(l)
        }
    }

    override func stopAccept(_ l: Listener) {
        pauseAccept(l)
        l.queue.finish()
        release(l)
    }

    /// Out of the epoll set: a level-triggered listener with connections waiting would
    /// otherwise wake every turn.
    override func pauseAccept(_ l: Listener) {
        if l.armed {
            _ = epoll_ctl(epfd, EPOLL_CTL_DEL, l.fd.rawValue, nil)
            l.armed = false
        }
    }

    private func accept(_ l: Listener) {
        while l.armed {
            let fd = cexactio_accept4(l.fd.rawValue, Int32(SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue))
            if fd >= 0 {
                accepted(fd, on: l)
                continue
            }
            let e = Errno(rawValue: errno)
            switch e {
            case .resourceTemporarilyUnavailable, .interrupted:
                return
            case .connectionAbort:
                continue
            case .tooManyOpenFiles, .tooManyOpenFilesInSystem, .noMemory, .noBufferSpace:
                // A shortage: out of the epoll set for a while, then try again.
                pauseAccept(l)
                retryAcceptLater(l)
                return
            default:
                l.queue.finish(throwing: e)
                pauseAccept(l)
                release(l)
                return
            }
        }
    }

    // MARK: The turn

    func turn(block: Bool, loop: IOLoop) {
        if failure != nil {
            // Commands are answered with the failure; sleep on the eventfd until shutdown.
            var pfd = pollfd(fd: waker.descriptor, events: Int16(POLLIN), revents: 0)
            if block && poll(&pfd, 1, 1000) > 0 { waker.drain() }
            return
        }
        var timeoutMs: Int32 = 0
        if block {
            let ns = nearestDeadline()
            timeoutMs = ns == 0 ? -1 : Int32(clamping: (ns + 999_999) / 1_000_000)
        }
        loop.count { $0.enters += 1 }
        let n = events.withUnsafeMutableBufferPointer { epoll_wait(epfd, $0.baseAddress, Int32($0.count), timeoutMs) }
        if n < 0 && errno != EINTR {
            // The epoll set itself failed (EBADF, EFAULT, EINVAL): stop using it.
            failForGood(Errno(rawValue: errno))
            return
        }
        if n > 0 {
            loop.count { $0.completions += Int(n) }
            for i in 0..<Int(n) {
                let tag = LoopTag(rawValue: events[i].data.u64)
                if tag.rawValue == EpollDriver.wakeTag {
                    waker.drain()
                    continue
                }
                switch entry(tag) {
                case .connection(let c)?:
                    if c.directInFlight {
                        readDirect(c, loop: loop)
                    } else if c.armed {
                        receive(c, loop: loop)
                    }
                case .listener(let l)?:
                    accept(l)
                case nil:
                    break
                }
            }
        }
        expireTimers(loop: loop)
    }

    func beginShutdown() {
        stopping = true
        interruptAll()
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                if c.directInFlight { cancelDirect(c) }
                detachKernel(c)
            case .listener(let l):
                stopAccept(l)
            }
        }
    }

    var isDrained: Bool { inflight == 0 }

    func finishShutdown(loop: IOLoop) {
        current = nil
        clearTable()
    }
}
