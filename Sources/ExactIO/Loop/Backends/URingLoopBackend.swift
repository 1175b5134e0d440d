#if EXACTIO_URING
import ExactIOCSupport
import SystemPackage

// The loop's io_uring backend: one ring (SINGLE_ISSUER with DEFER_TASKRUN where the kernel
// has it), the loop's receive buffers as a provided-buffer ring (consumed a part at a time
// where the kernel can, 6.12+), multishot RECV on sockets, a READ that selects a buffer on
// pipes, READ straight into a large body's memory, single-shot ACCEPT, SEND/SENDMSG (and their
// zero-copy forms SEND_ZC/SENDMSG_ZC where the probe finds them, each followed by its
// notification), and one io_uring_enter per turn for every submission and completion.

final class URingLoopBackend: LoopBackend {
    let ring: RingHandle
    let bufferRing: OpaquePointer
    let incremental: Bool
    let pool: ReceivePool
    let waker: Waker
    private var cqes: [csupport_cqe]
    /// With incremental consumption: the buffer the kernel is still filling, per buffer id,
    /// and how far it got.
    private var kernelHeld: [ReceiveBuffer?]
    private var kernelOffset: [Int]
    /// Requests whose final completion has not arrived.
    private(set) var inFlight = 0
    /// Whether the kernel takes a byte limit on multishot receives (6.16+); found out on the
    /// first refusal.
    private var receiveLimits = true
    private var stopping = false
    private var counters = LoopCounters()
    /// SEND_ZC and SENDMSG_ZC are there (6.0, 6.1).
    private(set) var supportsZeroCopy = false
    /// Zero-copy sends whose notification has not come, by user_data: the connection and the
    /// machine's id of the send. Their user_data is unique (a zero-copy send's notification may
    /// come after the connection's next send completed), so it names this record, not a slot.
    private var zeroCopySends: [UInt64: (connection: LoopConnection, id: UInt32)] = [:]
    private var nextZeroCopyTag: UInt32 = 0
    /// Test seam: notifications held back, and those held.
    private var holdingNotifications = false
    private var heldNotifications: [LoopCompletion] = []

    static let group: UInt32 = 7
    static let wakeTag = LoopTag(loopOwn: .wake).rawValue
    static let cancelAllTag = LoopTag(loopOwn: .cancelAll).rawValue
    /// The slot field of a zero-copy send's user_data (its generation numbers the send).
    static let zeroCopySlot = 0xff_fffe

    struct Failure: Error {
        let errno: Errno
        let reason: String
    }

    private init(ring: RingHandle, bufferRing: OpaquePointer, pool: ReceivePool, waker: Waker) {
        self.ring = ring
        self.bufferRing = bufferRing
        self.incremental = csupport_bufring_flags(bufferRing) & UInt32(CSUPPORT_BUFRING_INCREMENTAL) != 0
        self.pool = pool
        self.waker = waker
        self.cqes = Array(repeating: csupport_cqe(), count: 512)
        self.kernelHeld = Array(repeating: nil, count: pool.count)
        self.kernelOffset = Array(repeating: 0, count: pool.count)
    }

    /// A ring with SINGLE_ISSUER/DEFER_TASKRUN (or COOP_TASKRUN) and a buffer ring of the
    /// pool's buffers, or why not. Called on the loop's thread (a SINGLE_ISSUER ring belongs to
    /// the thread that creates it).
    static func make(pool: ReceivePool, waker: Waker) -> Result<URingLoopBackend, Failure> {
        let ring: RingHandle
        switch RingHandle.create(entries: 4096, flags: UInt32(CSUPPORT_RING_SINGLE_ISSUER)) {
        case .success(let r): ring = r
        case .failure(let e): return .failure(Failure(errno: e, reason: BackendSelection.ringFailure(e)))
        }
        let needed = URingOps([.read, .recv, .pollAdd, .asyncCancel, .accept])
        guard case .success(let ops) = ring.probe(), URingOps(rawValue: ops).isSuperset(of: needed) else {
            return .failure(Failure(errno: .notSupported, reason: "io_uring lacks READ, RECV, POLL_ADD, ASYNC_CANCEL or ACCEPT"))
        }
        var br: OpaquePointer? = nil
        let ret = csupport_bufring_create(ring.pointer, UInt32(pool.count), group, UInt32(CSUPPORT_BUFRING_INCREMENTAL), &br)
        guard ret == 0, let br else {
            let e = errnoFromNegative(ret)
            return .failure(Failure(
                errno: e, reason: "io_uring provided-buffer ring registration failed: \(BackendSelection.describe(e)) (kernel 5.19+)"))
        }
        let backend = URingLoopBackend(ring: ring, bufferRing: br, pool: pool, waker: waker)
        backend.supportsZeroCopy = URingOps(rawValue: ops).isSuperset(of: [.sendZC, .sendmsgZC])
        for bid in 0..<pool.count { backend.provide(UInt16(bid)) }
        csupport_bufring_publish(br)
        backend.armWake()
        return .success(backend)
    }

    var kind: ExactReader.Backend { .ioUring }
    var limitsReceives: Bool { receiveLimits }

    func close() {
        // Unregistered on the loop's thread: a SINGLE_ISSUER ring takes registrations only
        // from it. The ring itself closes with its handle.
        csupport_bufring_destroy(ring.pointer, bufferRing)
        kernelHeld = kernelHeld.map { _ in nil }
    }

    private func provide(_ bid: UInt16) {
        csupport_bufring_add(bufferRing, pool.address(bid), UInt32(pool.size), bid)
    }

    private func armWake() {
        if csupport_queue_poll(ring.pointer, waker.descriptor, UInt32(POLLIN), 1, Self.wakeTag) == 0 { inFlight += 1 }
    }

    /// Counts a request queued (`ret` 0), or converts its errno.
    private func queued(_ ret: Int32, read: Bool = false) -> Errno? {
        guard ret == 0 else { return errnoFromNegative(ret) }
        inFlight += 1
        if read { counters.reads += 1 }
        return nil
    }

    // MARK: Operations

    func armReceive(_ c: LoopConnection, _ target: ReceiveTarget) -> Errno? {
        let ret: Int32
        switch target {
        case .own(let region, let offset, let count):
            c.kernel.ownTarget = (region, offset, count)
            c.kernel.receiveLimit = 0
            let dst = region.base + offset
            ret = c.isSocket
                ? csupport_queue_recv(ring.pointer, c.fd.rawValue, dst, UInt32(count), 0, c.tag(.receive))
                : csupport_queue_read(ring.pointer, c.fd.rawValue, dst, UInt32(count), -1, c.tag(.receive))
        case .shared(let limit) where c.isSocket:
            c.kernel.receiveLimit = receiveLimits ? UInt32(clamping: limit) : 0
            ret = csupport_queue_recv_multishot(ring.pointer, c.fd.rawValue, Self.group, c.kernel.receiveLimit, c.tag(.receive))
        case .shared:
            c.kernel.receiveLimit = 0
            ret = csupport_queue_read_select(ring.pointer, c.fd.rawValue, Self.group, UInt32(pool.size), c.tag(.receive))
        }
        if ret != 0 { c.kernel.ownTarget = nil }
        return queued(ret, read: true)
    }

    func disarmReceive(_ c: LoopConnection) {
        _ = queued(csupport_queue_cancel(ring.pointer, c.tag(.receive), 0, c.tag(.cancel)))
    }

    func read(_ c: LoopConnection, into dst: UnsafeMutableRawBufferPointer, slot: Int32) -> Errno? {
        if c.isSocket && slot < 0 {
            // A socket's body in one request: the kernel receives until all of it arrived (or
            // the end, an error, a cancellation, which report what did arrive).
            return queued(
                csupport_queue_recv(ring.pointer, c.fd.rawValue, dst.baseAddress, UInt32(dst.count), Int32(MSG_WAITALL | MSG_NOSIGNAL), c.tag(.read)),
                read: true)
        }
        return queued(csupport_queue_read(ring.pointer, c.fd.rawValue, dst.baseAddress, UInt32(dst.count), slot, c.tag(.read)), read: true)
    }

    func cancelRead(_ c: LoopConnection) {
        _ = queued(csupport_queue_cancel(ring.pointer, c.tag(.read), 0, c.tag(.cancel)))
    }

    func forget(_ c: LoopConnection) {}

    func send(_ c: LoopConnection, _ iov: UnsafeBufferPointer<iovec>, zeroCopy: Bool, id: UInt32) -> Errno? {
        guard let s = c.sender else { return .invalidArgument }
        let tag: UInt64
        if zeroCopy {
            nextZeroCopyTag &+= 1
            tag = LoopTag(LoopToken(slot: Self.zeroCopySlot, generation: nextZeroCopyTag), .sendZC).rawValue
        } else {
            tag = c.tag(.send)
        }
        s.kernel.tag = tag
        let ret: Int32
        if iov.count == 1 {
            ret = csupport_queue_send(ring.pointer, c.fd.rawValue, iov[0].iov_base, UInt32(iov[0].iov_len), zeroCopy ? 1 : 0, tag)
        } else {
            s.msg.pointee = msghdr()
            s.msg.pointee.msg_iov = UnsafeMutablePointer(mutating: iov.baseAddress)
            s.msg.pointee.msg_iovlen = iov.count
            ret = csupport_queue_sendmsg(ring.pointer, c.fd.rawValue, s.msg, zeroCopy ? 1 : 0, tag)
        }
        if ret == 0 {
            counters.sends += 1
            if zeroCopy { zeroCopySends[tag] = (c, id) }
        }
        return queued(ret)
    }

    func cancelSend(_ c: LoopConnection) {
        guard let s = c.sender else { return }
        _ = queued(csupport_queue_cancel(ring.pointer, s.kernel.tag, 0, c.tag(.cancel)))
    }

    func holdNotifications(_ hold: Bool) {
        holdingNotifications = hold
    }

    func refuseZeroCopy() {
        supportsZeroCopy = false
    }

    func accept(_ l: Listener, count: Int) -> (armed: Int, error: Errno?) {
        for k in 0..<count {
            if let e = queued(csupport_queue_accept(ring.pointer, l.fd.rawValue, 1, LoopTag(l.token, .accept).rawValue)) {
                return (k, e)
            }
        }
        return (count, nil)
    }

    func cancelAccepts(_ l: Listener) {
        _ = queued(csupport_queue_cancel(ring.pointer, LoopTag(l.token, .accept).rawValue, 1, LoopTag(l.token, .cancel).rawValue))
    }

    func giveBack(_ bids: [UInt16]) {
        for bid in bids { provide(bid) }
        csupport_bufring_publish(bufferRing)
    }

    func cancelAll() {
        stopping = true
        _ = queued(csupport_queue_cancel_all(ring.pointer, Self.cancelAllTag))
    }

    func injectWaitFailures(count: Int, errno: Int32) {
        csupport_debug_fail_waits(ring.pointer, Int32(count), errno)
    }

    func takeCounters() -> LoopCounters {
        defer { counters = LoopCounters() }
        return counters
    }

    // MARK: The turn

    func turn(timeout: Int64?, resolve: (LoopToken) -> LoopEntry?, into completions: inout [LoopCompletion]) -> Errno? {
        var timeout = timeout
        if !holdingNotifications && !heldNotifications.isEmpty {
            // Notifications the seam held back: delivered now, without waiting in the kernel.
            completions.append(contentsOf: heldNotifications)
            heldNotifications.removeAll()
            timeout = 0
        }
        counters.enters += 1
        // Passing ends of a wait (a signal, the timeout, a full completion queue) come back as
        // 0 from csupport_enter.
        let ret = csupport_enter(ring.pointer, timeout == 0 ? 0 : 1, timeout ?? 0)
        if ret < 0 { return errnoFromNegative(ret) }
        while true {
            let n = cqes.withUnsafeMutableBufferPointer { csupport_reap(ring.pointer, $0.baseAddress, UInt32($0.count)) }
            if n == 0 { break }
            counters.completions += Int(n)
            for i in 0..<Int(n) { convert(cqes[i], resolve, &completions) }
            if n < UInt32(cqes.count) { break }
        }
        return nil
    }

    private func convert(_ cqe: csupport_cqe, _ resolve: (LoopToken) -> LoopEntry?, _ out: inout [LoopCompletion]) {
        let more = cqe.flags & UInt16(CSUPPORT_CQE_MORE) != 0
        let hasBuffer = cqe.flags & UInt16(CSUPPORT_CQE_BUFFER) != 0
        if LoopTag(rawValue: cqe.user_data).kind == .sendZC {
            zeroCopyCompleted(cqe, more: more, &out)
            return
        }
        if !more { inFlight -= 1 }
        if cqe.user_data == Self.wakeTag {
            waker.drain()
            if !more && !stopping { armWake() }
            return
        }
        let tag = LoopTag(rawValue: cqe.user_data)
        if cqe.user_data == Self.cancelAllTag || tag.kind == .cancel { return }
        // A completion for a slot that was reused (or freed): its buffer goes back at once.
        guard let entry = resolve(tag.token) else {
            if hasBuffer { _ = segment(cqe) }
            return
        }
        switch (entry, tag.kind) {
        case (.connection(let c), .receive?):
            received(c, cqe, more: more, hasBuffer: hasBuffer, &out)
        case (.connection(let c), .read?):
            out.append(.read(c, count: max(Int(cqe.res), 0), error: cqe.res < 0 ? errnoFromNegative(cqe.res) : nil))
        case (.listener(let l), .accept?):
            out.append(.accepted(l, cqe.res >= 0 ? .success(cqe.res) : .failure(errnoFromNegative(cqe.res))))
        case (.connection(let c), .send?):
            out.append(.sent(c, count: max(Int(cqe.res), 0), error: cqe.res < 0 ? errnoFromNegative(cqe.res) : nil, notification: false))
        default:
            if hasBuffer { _ = segment(cqe) }
        }
    }

    /// A zero-copy send's completion (the send: bytes taken or an errno, and with MORE its
    /// notification to follow), or its notification (the kernel let go of the memory). The
    /// send itself counts as done at its completion: shutdown does not wait for a notification,
    /// which a peer that stopped reading can delay for as long as the connection stays open.
    private func zeroCopyCompleted(_ cqe: csupport_cqe, more: Bool, _ out: inout [LoopCompletion]) {
        let tag = cqe.user_data
        guard let (c, id) = zeroCopySends[tag] else { return }
        if cqe.flags & UInt16(CSUPPORT_CQE_NOTIF) != 0 {
            zeroCopySends[tag] = nil
            let released = LoopCompletion.sendReleased(c, id: id)
            if holdingNotifications {
                heldNotifications.append(released)
            } else {
                out.append(released)
            }
            return
        }
        inFlight -= 1
        if !more { zeroCopySends[tag] = nil }
        out.append(.sent(c, count: max(Int(cqe.res), 0), error: cqe.res < 0 ? errnoFromNegative(cqe.res) : nil, notification: more))
    }

    private func received(_ c: LoopConnection, _ cqe: csupport_cqe, more: Bool, hasBuffer: Bool, _ out: inout [LoopCompletion]) {
        let res = cqe.res
        let end: ReceiveEnd = more ? .more : .done
        if !hasBuffer, let own = c.kernel.ownTarget {
            // A receive into the connection's own memory: single-shot.
            c.kernel.ownTarget = nil
            if res > 0 {
                out.append(.received(c, .own(own.region, start: own.offset, count: Int(res)), .done))
                return
            }
        } else if res > 0, let segment = segment(cqe) {
            out.append(.received(c, .shared(segment), end))
            return
        } else if hasBuffer {
            _ = segment(cqe)
        }
        guard !more else { return }
        switch res {
        case -EINVAL where c.kernel.receiveLimit > 0 && receiveLimits:
            // This kernel takes no byte limit on multishot receives: the same receive again,
            // without one (the machine stops it once the reader has enough).
            receiveLimits = false
            if let e = armReceive(c, .shared(limit: 0)) { out.append(.received(c, nil, .failed(e))) }
        case 0: out.append(.received(c, nil, .endOfStream))
        case -ENOBUFS: out.append(.received(c, nil, .noBuffers))
        case -ECANCELED: out.append(.received(c, nil, .canceled))
        default: out.append(.received(c, nil, .failed(errnoFromNegative(res))))
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
}
#endif
