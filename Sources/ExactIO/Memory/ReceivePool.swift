import Synchronization
import SystemPackage

// ReceivePool: the loop's receive buffers, shared by its connections, and ReceiveBuffer, the
// owner of one while its bytes are in use.

/// The loop's receive memory, shared by all its connections: `count` buffers of `size` bytes
/// in one mapping (pages are committed when the kernel first writes them). On io_uring they are
/// provided buffers (the kernel picks one when data arrives, so an idle connection holds no
/// memory); on epoll the loop picks them itself for each `read(2)`.
///
/// A buffer in use is owned by a `ReceiveBuffer` object, which the segments and views of its
/// bytes share; when the last one goes, the buffer id is queued here and the loop gives it
/// back to the kernel (or its free list) on its next turn.
final class ReceivePool: @unchecked Sendable {
    // @unchecked Sendable: `base`, `size`, `count` are immutable; `returned` is behind its
    // mutex; `starved` is atomic.
    let base: UnsafeMutableRawPointer
    let size: Int
    let count: Int
    /// Room for every buffer from the start: giving one back (on whatever thread lets go of
    /// it, a reader's included) never allocates.
    private let returned: Locked<[UInt16]>
    /// Set while some connection waits for buffers (ENOBUFS): a returned buffer then wakes the
    /// loop, which would otherwise sleep with nothing to receive into.
    let starved = Atomic<Bool>(false)
    /// Wakes the loop (an eventfd write).
    let wake: @Sendable () -> Void
    /// Buffers out of the pool (held by the kernel, by segments or by views).
    let outstanding = Atomic<Int>(0)

    init(count: Int, size: Int, wake: @escaping @Sendable () -> Void) throws(Errno) {
        let bytes = count * size
        guard let raw = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | Platform.mapAnonymous, -1, 0), raw != MAP_FAILED
        else { throw Errno(rawValue: errno) }
        self.base = raw
        self.size = size
        self.count = count
        self.wake = wake
        var room = [UInt16]()
        room.reserveCapacity(count)
        self.returned = Locked(room)
    }

    deinit {
        munmap(base, count * size)
    }

    @inline(__always)
    func address(_ bid: UInt16) -> UnsafeMutableRawPointer {
        base + Int(bid) * size
    }

    /// True when few buffers are left (a quarter or less), or some connection waits for one:
    /// partial frames should then not keep buffers out of the pool (see `SegmentBuffer.detach`).
    var isLow: Bool {
        starved.load(ordering: .relaxed) || outstanding.load(ordering: .relaxed) * 4 >= count * 3
    }

    /// Called when the last user of a buffer lets go (any thread).
    func giveBack(_ bid: UInt16) {
        outstanding.subtract(1, ordering: .relaxed)
        returned.withLock { $0.append(bid) }
        if starved.load(ordering: .acquiring) { wake() }
    }

    /// The buffers given back since the last call, in `out` (the loop's thread). The arrays
    /// are swapped, not copied: with room for every buffer in `out`, neither side allocates.
    func takeReturned(into out: inout [UInt16]) {
        out.removeAll(keepingCapacity: true)
        returned.withLock { r in swap(&r, &out) }
    }
}

/// One receive buffer while its bytes are in use: the segments and views of those bytes hold
/// it, and (with incremental consumption) the loop while the kernel may still fill it. When the
/// last holder lets go, the buffer goes back to the pool.
final class ReceiveBuffer: @unchecked Sendable {
    // @unchecked Sendable: immutable; its bytes are read-only once handed out.
    let pool: ReceivePool
    let bid: UInt16

    init(pool: ReceivePool, bid: UInt16) {
        self.pool = pool
        self.bid = bid
        pool.outstanding.add(1, ordering: .relaxed)
    }

    var base: UnsafeMutableRawPointer { pool.address(bid) }

    deinit { pool.giveBack(bid) }
}
