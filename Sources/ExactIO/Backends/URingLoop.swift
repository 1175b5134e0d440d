#if EXACTIO_URING
import ExactIOCSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage

// The loop's io_uring backend: with `URingBackend.swift`, the only Swift that calls ExactIOCSupport.

/// The loop on one io_uring ring: received bytes land in provided buffers (a buffer ring the
/// kernel picks from, consumed a part at a time where the kernel can, 6.12+), sockets receive
/// with multishot RECV (pipes with a READ that selects a buffer, re-armed per completion),
/// large bodies are READs straight into their memory, and each turn submits every queued
/// request and waits for completions with one `io_uring_enter`.
final class URingLoopDriver: LoopDriverBase, LoopDriver {
    let ring: OpaquePointer
    let bufferRing: OpaquePointer
    let incremental: Bool
    let waker: Waker
    private var cqes: [csupport_cqe]
    /// With incremental consumption: the buffer the kernel is still filling, per buffer id,
    /// and how far it got.
    private var kernelHeld: [ReceiveBuffer?]
    private var kernelOffset: [Int]
    /// Requests whose final completion has not arrived.
    private var inflight = 0
    /// Whether the kernel takes a byte limit on multishot receives (6.16+): with it, a
    /// connection receives at most its backpressure bound; without it, the bound stops
    /// receiving a moment late (what the kernel received meanwhile still arrives).
    private var receiveLimits = true
    private var closed = false

    static let group: UInt32 = 7
    static let wakeTag = LoopTag(slot: 0xff_ffff, generation: 0, kind: .wake).rawValue
    static let cancelAllTag = LoopTag(slot: 0xff_ffff, generation: 0, kind: .cancelAll).rawValue

    struct Failure: Error {
        let errno: Errno
        let reason: String
    }

    private init(ring: OpaquePointer, bufferRing: OpaquePointer, pool: ReceivePool, waker: Waker) {
        self.ring = ring
        self.bufferRing = bufferRing
        self.incremental = csupport_bufring_flags(bufferRing) & UInt32(CSUPPORT_BUFRING_INCREMENTAL) != 0
        self.waker = waker
        self.cqes = Array(repeating: csupport_cqe(), count: 512)
        self.kernelHeld = Array(repeating: nil, count: pool.count)
        self.kernelOffset = Array(repeating: 0, count: pool.count)
        super.init(pool: pool)
    }

    /// A ring with SINGLE_ISSUER/DEFER_TASKRUN (or COOP_TASKRUN) and a buffer ring of the
    /// pool's buffers, or why not.
    static func make(pool: ReceivePool, waker: Waker) -> Result<URingLoopDriver, Failure> {
        var ring: OpaquePointer? = nil
        var ret = csupport_ring_create(4096, UInt32(CSUPPORT_RING_SINGLE_ISSUER), &ring)
        guard ret == 0, let ring else {
            let e = errnoFromNegative(ret)
            return .failure(Failure(errno: e, reason: BackendSelection.ringFailure(e)))
        }
        let ops = csupport_ring_probe(ring)
        let needed = Int32(CSUPPORT_OP_READ | CSUPPORT_OP_RECV | CSUPPORT_OP_POLL_ADD | CSUPPORT_OP_ASYNC_CANCEL | CSUPPORT_OP_ACCEPT)
        guard ops >= 0, ops & needed == needed else {
            csupport_ring_destroy(ring)
            return .failure(Failure(errno: .notSupported, reason: "io_uring lacks READ, RECV, POLL_ADD, ASYNC_CANCEL or ACCEPT"))
        }
        var br: OpaquePointer? = nil
        ret = csupport_bufring_create(ring, UInt32(pool.count), group, UInt32(CSUPPORT_BUFRING_INCREMENTAL), &br)
        guard ret == 0, let br else {
            csupport_ring_destroy(ring)
            let e = errnoFromNegative(ret)
            return .failure(Failure(
                errno: e, reason: "io_uring provided-buffer ring registration failed: \(BackendSelection.describe(e)) (kernel 5.19+)"))
        }
        let driver = URingLoopDriver(ring: ring, bufferRing: br, pool: pool, waker: waker)
        for bid in 0..<pool.count { driver.provide(UInt16(bid)) }
        csupport_bufring_publish(br)
        driver.armWake()
        return .success(driver)
    }

    var kind: ExactReader.Backend { .ioUring }

    func close() {
        guard !closed else { return }
        closed = true
        csupport_bufring_destroy(ring, bufferRing)
        csupport_ring_destroy(ring)
    }

    private func provide(_ bid: UInt16) {
        csupport_bufring_add(bufferRing, pool.address(bid), UInt32(pool.size), bid)
    }

    private func armWake() {
        if csupport_queue_poll(ring, waker.descriptor, UInt32(POLLIN), 1, URingLoopDriver.wakeTag) == 0 { inflight += 1 }
    }

    // MARK: Receiving

    override func startReceive(_ c: LoopConnection, loop: IOLoop) {
        var limit: UInt32 = 0
        if receiveLimits {
            // At most the backpressure bound, and what the reader wants ahead: after a large
            // frame only its next prefix, not the next body (which goes to its own memory).
            let (queued, wanted) = c.state.withLock { ($0.held, $0.wanted) }
            limit = UInt32(clamping: max(min(c.maxBuffered - queued, wanted), 4096))
        }
        c.receiveLimit = limit
        let ret = c.isSocket
            ? csupport_queue_recv_multishot(ring, c.fd.rawValue, URingLoopDriver.group, limit, c.tag(.receive))
            : csupport_queue_read_select(ring, c.fd.rawValue, URingLoopDriver.group, UInt32(pool.size), c.tag(.receive))
        guard ret == 0 else {
            c.finishReceiving(eof: false, error: errnoFromNegative(ret))
            return
        }
        loop.count { $0.reads += 1 }
        inflight += 1
        c.armed = true
        c.state.withLock { $0.receiving = true }
    }

    /// A single read into a region of its own, for a connection the dry pool could not serve.
    private func startReceiveIntoOwnMemory(_ c: LoopConnection, loop: IOLoop) -> Bool {
        guard let region = try? Region.standalone(capacity: pool.size) else { return false }
        let ret = csupport_queue_read(ring, c.fd.rawValue, region.base, UInt32(pool.size), -1, c.tag(.receive))
        guard ret == 0 else { return false }
        c.fallback = region
        loop.count { $0.reads += 1 }
        inflight += 1
        c.armed = true
        c.receiveLimit = 0
        c.state.withLock { $0.receiving = true }
        return true
    }

    override func stopReceive(_ c: LoopConnection) {
        guard c.armed, !c.disarming else { return }
        c.disarming = true
        if csupport_queue_cancel(ring, c.tag(.receive), 0, c.tag(.cancel)) == 0 { inflight += 1 }
    }

    override func startDirect(_ c: LoopConnection, loop: IOLoop) {
        // Anything the receive met first (bytes, an error such as a reset, the end) comes before
        // the read: the reader is sent back to take it. A reset met by the receive and then a
        // direct read that sees only the end would turn the reset into a clean end.
        let request = c.state.withLock { s -> DirectRequest? in s.hasNews ? nil : s.direct }
        guard let d = request else {
            c.directProgress(0, finished: true, error: nil, retry: true)
            return
        }
        queueDirect(c, d, loop: loop)
    }

    private func queueDirect(_ c: LoopConnection, _ d: DirectRequest, loop: IOLoop) {
        let len = UInt32(min(d.dst.count - d.got, 1 << 30))
        let ret = csupport_queue_read(ring, c.fd.rawValue, d.dst.baseAddress! + d.got, len, d.slot, c.tag(.direct))
        guard ret == 0 else {
            c.directProgress(0, finished: true, error: errnoFromNegative(ret))
            return
        }
        loop.count { $0.reads += 1 }
        inflight += 1
        c.directInFlight = true
        c.directCancelSent = false
    }

    override func cancelDirect(_ c: LoopConnection) {
        guard c.directInFlight, !c.directCancelSent else { return }
        c.directCancelSent = true
        if csupport_queue_cancel(ring, c.tag(.direct), 0, c.tag(.cancel)) == 0 { inflight += 1 }
    }

    // MARK: Accepting

    /// Accepts in flight per listener at most: single-shot ACCEPTs, so that accepted
    /// descriptors waiting for the consumer plus accepts in flight never pass the queue's
    /// bound (a multishot accept takes the whole backlog at once).
    static let acceptsInFlight = 16

    override func startAccept(_ l: Listener, loop: IOLoop) {
        let room = l.queue.room
        var wanted = min(Self.acceptsInFlight, room) - l.inFlight
        if wanted <= 0 && l.inFlight == 0 {
            // No room at all: wait for the consumer (the queue says when).
            if l.queue.pauseIfFull() {
                l.paused = true
                return
            }
            wanted = 1  // it took some meanwhile
        }
        while wanted > 0 {
            let ret = csupport_queue_accept(ring, l.fd.rawValue, 1, l.tag)
            guard ret == 0 else {
                if l.inFlight == 0 {
                    l.queue.finish(throwing: errnoFromNegative(ret))
                    release(l)
                }
                return
            }
            inflight += 1
            l.inFlight += 1
            wanted -= 1
        }
        l.armed = true
    }

    override func stopAccept(_ l: Listener) {
        guard l.armed else {
            l.queue.finish()
            release(l)
            return
        }
        let cancelTag = LoopTag(slot: l.slot, generation: l.generation, kind: .cancel).rawValue
        if csupport_queue_cancel(ring, l.tag, 1, cancelTag) == 0 { inflight += 1 }
    }

    /// Nothing to do: the accepts in flight fit the room the queue had; no more are armed
    /// until `resumeAccept`.
    override func pauseAccept(_ l: Listener) {}

    func giveBack(_ bids: [UInt16], loop: IOLoop) {
        guard !bids.isEmpty else { return }
        for bid in bids { provide(bid) }
        csupport_bufring_publish(bufferRing)
        resumeStarved(loop: loop)
    }

    // MARK: The turn

    func turn(block: Bool, loop: IOLoop) {
        if let failure {
            waitAfterFailure(block: block, failure)
            return
        }
        let timeout = block ? nearestDeadline() : 0
        loop.count { $0.enters += 1 }
        // Passing ends of a wait (a signal, the timeout, a full completion queue) come back as 0
        // from csupport_enter: reap and go on.
        let ret = csupport_enter(ring, block ? 1 : 0, timeout)
        if ret < 0 {
            // The ring itself failed: stop using it. Every reader fails with the error, and
            // shutdown() can run (it does not wait for requests the ring cannot confirm).
            failForGood(errnoFromNegative(ret))
            return
        }
        while true {
            let n = cqes.withUnsafeMutableBufferPointer { csupport_reap(ring, $0.baseAddress, UInt32($0.count)) }
            if n == 0 { break }
            loop.count { $0.completions += Int(n) }
            for i in 0..<Int(n) { dispatch(cqes[i], loop: loop) }
            if n < UInt32(cqes.count) { break }
        }
        expireTimers(loop: loop)
    }

    /// After the ring failed: commands are answered with the failure as they come, and the
    /// loop sleeps on its eventfd, not the ring, until it is shut down.
    private func waitAfterFailure(block: Bool, _ failure: Errno) {
        guard block else { return }
        var pfd = pollfd(fd: waker.descriptor, events: Int16(POLLIN), revents: 0)
        if poll(&pfd, 1, 1000) > 0 { waker.drain() }
    }

    override func injectEnterFailures(count: Int, errno: Int32) {
        csupport_debug_fail_waits(ring, Int32(count), errno)
    }

    private func dispatch(_ cqe: csupport_cqe, loop: IOLoop) {
        let more = cqe.flags & UInt16(CSUPPORT_CQE_MORE) != 0
        if !more { inflight -= 1 }
        if cqe.user_data == URingLoopDriver.wakeTag {
            waker.drain()
            if !more && !stopping { armWake() }
            return
        }
        if cqe.user_data == URingLoopDriver.cancelAllTag || cqe.user_data & 0xff == LoopTag.Kind.cancel.rawValue {
            return
        }
        let tag = LoopTag(rawValue: cqe.user_data)
        // A completion for a slot that was reused (or freed): its buffer goes back at once.
        guard let entry = entry(tag) else {
            if cqe.flags & UInt16(CSUPPORT_CQE_BUFFER) != 0 { _ = segment(cqe) }
            return
        }
        switch (entry, tag.kind) {
        case (.connection(let c), .receive?):
            received(c, cqe, more: more, loop: loop)
        case (.connection(let c), .direct?):
            directDone(c, cqe, loop: loop)
        case (.listener(let l), .accept?):
            accepted(l, cqe, loop: loop)
        default:
            break
        }
    }

    /// The received bytes of a completion, as a segment of its provided buffer.
    private func segment(_ cqe: csupport_cqe) -> Segment? {
        let bid = Int(cqe.buffer)
        let bytes = max(Int(cqe.res), 0)
        let bufferMore = cqe.flags & UInt16(CSUPPORT_CQE_BUFFER_MORE) != 0
        let owner: ReceiveBuffer
        let start: Int
        if incremental {
            owner = kernelHeld[bid] ?? ReceiveBuffer(pool: pool, bid: UInt16(bid))
            start = kernelOffset[bid]
            if bufferMore {
                kernelHeld[bid] = owner
                kernelOffset[bid] = start + bytes
            } else {
                kernelHeld[bid] = nil
                kernelOffset[bid] = 0
            }
        } else {
            owner = ReceiveBuffer(pool: pool, bid: UInt16(bid))
            start = 0
        }
        guard bytes > 0 else { return nil }
        return Segment(owner: owner, base: owner.base, start: start, end: start + bytes)
    }

    private func received(_ c: LoopConnection, _ cqe: csupport_cqe, more: Bool, loop: IOLoop) {
        let res = cqe.res
        // A read into memory of its own (the pool was dry) has no provided buffer.
        var own: Segment? = nil
        if let region = c.fallback, cqe.flags & UInt16(CSUPPORT_CQE_BUFFER) == 0 {
            c.fallback = nil
            if res > 0 { own = ownSegment(region, count: Int(res)) }
        }
        if res > 0, let seg = own ?? segment(cqe) {
            if c.detached {
                if !more { receiveEnded(c, loop: loop) }
                return
            }
            var full = c.deliver(seg)
            if c.receiveLimit == 0 {
                // Without the kernel's byte limit, stop once the reader has what it wants ahead.
                full = full || c.state.withLock { $0.received.bytes >= $0.wanted }
            }
            if !more {
                // A single-shot receive (pipes), or a multishot one the kernel ended: go on
                // unless the reader has enough.
                c.armed = false
                if c.disarming || full || c.directPending || stopping {
                    c.receivingStopped()
                    receiveEnded(c, loop: loop)
                } else {
                    startReceive(c, loop: loop)
                }
            } else if full {
                stopReceive(c)
            }
            return
        }
        if cqe.flags & UInt16(CSUPPORT_CQE_BUFFER) != 0 { _ = segment(cqe) }
        guard !more else { return }
        if res == -EINVAL && c.receiveLimit > 0 && receiveLimits {
            // This kernel takes no byte limit on multishot receives: arm without one.
            receiveLimits = false
            c.armed = false
            startReceive(c, loop: loop)
            return
        }
        let wasDisarming = c.disarming
        switch res {
        case 0:
            c.finishReceiving(eof: true, error: nil)
        case -ENOBUFS:
            // The buffers ran out. One read into memory of its own keeps the connection going:
            // waiting for buffers could wait forever when views the application keeps hold
            // them all (readers waiting for frames, holding views of every buffer).
            loop.count { $0.starvations += 1 }
            if !pool.starved.exchange(true, ordering: .acquiringAndReleasing) { evacuateQueues() }
            if !c.detached && !stopping && !wasDisarming && !c.directPending && !c.rearmWhenDisarmed
                && startReceiveIntoOwnMemory(c, loop: loop) {
                return
            }
            // Not even that: receive again when buffers come back (no busy loop).
            if !c.detached && !c.starved {
                c.starved = true
                starved.append(c)
            }
            // `receiving` stays set: the loop owes this connection a receive, and arms it when
            // buffers come back (giveBack), so the reader does not ask for one in vain.
            if c.detached { c.receivingStopped() }
        case -ECANCELED:
            c.receivingStopped()
        default:
            if wasDisarming && res == -EINTR {
                c.receivingStopped()
            } else {
                c.finishReceiving(eof: false, error: errnoFromNegative(res))
            }
        }
        // Last: it may arm again (a reader that asked meanwhile), which marks it receiving.
        receiveEnded(c, loop: loop)
    }

    private func directDone(_ c: LoopConnection, _ cqe: csupport_cqe, loop: IOLoop) {
        c.directInFlight = false
        let res = Int(cqe.res)
        guard let d = c.state.withLock({ $0.direct }) else {
            releaseIfIdle(c)
            return
        }
        if res > 0 {
            let got = d.got + res
            if got >= d.minimum || c.directCancelSent || c.detached || stopping {
                c.directProgress(res, finished: true, error: nil)
            } else {
                c.directProgress(res, finished: false, error: nil)
                var next = d
                next.got = got
                queueDirect(c, next, loop: loop)
            }
        } else if res == 0 {
            c.directProgress(0, finished: true, error: nil)
        } else {
            c.directProgress(0, finished: true, error: errnoFromNegative(Int32(res)))
        }
        releaseIfIdle(c)
    }

    private func accepted(_ l: Listener, _ cqe: csupport_cqe, loop: IOLoop) {
        l.inFlight -= 1
        l.armed = l.inFlight > 0
        if cqe.res >= 0 {
            if l.closing || stopping {
                _ = posixClose(cqe.res)
            } else {
                accepted(cqe.res, on: l)
            }
        }
        if l.closing || stopping {
            if l.inFlight == 0 {
                l.queue.finish()
                release(l)
            }
            return
        }
        switch cqe.res < 0 ? errnoFromNegative(cqe.res) : nil {
        case nil, .connectionAbort?, .interrupted?:
            if !l.paused && l.retryAt == 0 { startAccept(l, loop: loop) }
        case .canceled?:
            break
        case .tooManyOpenFiles?, .tooManyOpenFilesInSystem?, .noBufferSpace?, .noMemory?:
            // A shortage: no accept is re-armed until the pause is over.
            if l.retryAt == 0 { retryAcceptLater(l) }
        case let e?:
            l.closing = true
            l.queue.finish(throwing: e)
            if l.inFlight == 0 {
                release(l)
            } else {
                stopAccept(l)
            }
        }
    }

    // MARK: Shutdown

    func beginShutdown() {
        stopping = true
        interruptAll()
        if csupport_queue_cancel_all(ring, URingLoopDriver.cancelAllTag) == 0 { inflight += 1 }
    }

    /// Every request ended; after a failure of the ring, nothing more can be confirmed, and
    /// memory those requests targeted was given up (`LoopConnection.fail`).
    var isDrained: Bool { inflight <= 0 || failure != nil }

    func finishShutdown(loop: IOLoop) {
        for case let entry? in entries {
            if case .listener(let l) = entry { l.queue.finish() }
        }
        kernelHeld = kernelHeld.map { _ in nil }
        clearTable()
    }
}
#endif
