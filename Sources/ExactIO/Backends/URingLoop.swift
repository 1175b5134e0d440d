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
    let eventFD: Int32
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

    private init(ring: OpaquePointer, bufferRing: OpaquePointer, pool: ReceivePool, eventFD: Int32) {
        self.ring = ring
        self.bufferRing = bufferRing
        self.incremental = csupport_bufring_flags(bufferRing) & UInt32(CSUPPORT_BUFRING_INCREMENTAL) != 0
        self.eventFD = eventFD
        self.cqes = Array(repeating: csupport_cqe(), count: 512)
        self.kernelHeld = Array(repeating: nil, count: pool.count)
        self.kernelOffset = Array(repeating: 0, count: pool.count)
        super.init(pool: pool)
    }

    /// A ring with SINGLE_ISSUER/DEFER_TASKRUN (or COOP_TASKRUN) and a buffer ring of the
    /// pool's buffers, or why not.
    static func make(pool: ReceivePool, eventFD: Int32) -> Result<URingLoopDriver, Failure> {
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
        let driver = URingLoopDriver(ring: ring, bufferRing: br, pool: pool, eventFD: eventFD)
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
        if csupport_queue_poll(ring, eventFD, UInt32(POLLIN), 1, URingLoopDriver.wakeTag) == 0 { inflight += 1 }
    }

    // MARK: Receiving

    override func startReceive(_ c: LoopConnection, loop: IOLoop) {
        var limit: UInt32 = 0
        if receiveLimits {
            // At most the backpressure bound, and what the reader wants ahead: after a large
            // frame only its next prefix, not the next body (which goes to its own memory).
            let (queued, wanted) = c.state.withLock { ($0.receivedBytes, $0.wanted) }
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
        if csupport_queue_cancel(ring, c.tag(.receive), c.tag(.cancel)) == 0 { inflight += 1 }
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
        if csupport_queue_cancel(ring, c.tag(.direct), c.tag(.cancel)) == 0 { inflight += 1 }
    }

    // MARK: Accepting

    override func startAccept(_ l: Listener, loop: IOLoop) {
        let tag = LoopTag(slot: l.slot, generation: l.generation, kind: .accept).rawValue
        let ret = csupport_queue_accept_multishot(ring, l.fd.rawValue, tag)
        if ret == 0 {
            inflight += 1
            l.armed = true
        } else {
            l.queue.finish(throwing: errnoFromNegative(ret))
            release(slot: l.slot)
        }
    }

    override func stopAccept(_ l: Listener) {
        guard l.armed else {
            l.queue.finish()
            release(slot: l.slot)
            return
        }
        let tag = LoopTag(slot: l.slot, generation: l.generation, kind: .accept).rawValue
        if csupport_queue_cancel(ring, tag, LoopTag(slot: l.slot, generation: l.generation, kind: .cancel).rawValue) == 0 {
            inflight += 1
        }
    }

    func giveBack(_ bids: [UInt16], loop: IOLoop) {
        guard !bids.isEmpty else { return }
        for bid in bids { provide(bid) }
        csupport_bufring_publish(bufferRing)
        resumeStarved(loop: loop)
    }

    // MARK: The turn

    func turn(block: Bool, loop: IOLoop) {
        let timeout = block ? nearestDeadline() : 0
        loop.count { $0.enters += 1 }
        let ret = csupport_enter(ring, block ? 1 : 0, timeout)
        if ret < 0 && ret != -EBUSY && ret != -EAGAIN {
            // The ring itself failed (never seen): stop rather than spin.
            fatalError("ExactIO: io_uring_enter on the loop's ring failed: \(errnoFromNegative(ret))")
        }
        while true {
            let n = cqes.withUnsafeMutableBufferPointer { csupport_reap(ring, $0.baseAddress, UInt32($0.count)) }
            if n == 0 { break }
            loop.count { $0.completions += Int(n) }
            for i in 0..<Int(n) { dispatch(cqes[i], loop: loop) }
            if n < UInt32(cqes.count) { break }
        }
        expireDeadlines()
    }

    private func dispatch(_ cqe: csupport_cqe, loop: IOLoop) {
        let more = cqe.flags & UInt16(CSUPPORT_CQE_MORE) != 0
        if !more { inflight -= 1 }
        if cqe.user_data == URingLoopDriver.wakeTag {
            var value: UInt64 = 0
            _ = posixRead(eventFD, &value, 8)
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
            accepted(l, cqe, more: more, loop: loop)
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
                full = full || c.state.withLock { $0.receivedBytes >= $0.wanted }
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

    private func accepted(_ l: Listener, _ cqe: csupport_cqe, more: Bool, loop: IOLoop) {
        if cqe.res >= 0 {
            if l.closing {
                posixClose(cqe.res)
            } else {
                l.queue.yield(FileDescriptor(rawValue: cqe.res))
            }
        }
        guard !more else { return }
        l.armed = false
        let e = cqe.res < 0 ? errnoFromNegative(cqe.res) : nil
        if l.closing || stopping || e == .canceled {
            l.queue.finish()
            release(slot: l.slot)
        } else if let e, e != .tooManyOpenFiles, e != .noBufferSpace, e != .noMemory, e != .connectionAbort {
            l.queue.finish(throwing: e)
            release(slot: l.slot)
        } else {
            startAccept(l, loop: loop)  // the kernel ended the multishot (or a passing shortage): go on
        }
    }

    // MARK: Shutdown

    func beginShutdown() {
        stopping = true
        interruptAll()
        if csupport_queue_cancel_all(ring, URingLoopDriver.cancelAllTag) == 0 { inflight += 1 }
    }

    var isDrained: Bool { inflight <= 0 }

    func finishShutdown(loop: IOLoop) {
        for case let entry? in entries {
            if case .listener(let l) = entry { l.queue.finish() }
        }
        kernelHeld = kernelHeld.map { _ in nil }
        clearTable()
    }
}
#endif
