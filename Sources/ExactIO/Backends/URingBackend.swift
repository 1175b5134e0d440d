import CSupport
import Glibc
import Synchronization
import SystemPackage

// The only Swift file that talks to CSupport (and so, through it, to liburing).

/// Owns a `csupport_ring`. Shared by the engine (submissions, reader's thread) and the
/// registrar (slot updates, possibly from the thread releasing the last view of a block), so
/// the ring lives until both are gone.
final class RingHandle: @unchecked Sendable {
    // @unchecked Sendable: submissions happen only from the reader's owner (the reader is not
    // Sendable); other threads only issue register syscalls, which the kernel serializes.
    let pointer: OpaquePointer

    private init(pointer: OpaquePointer) { self.pointer = pointer }

    /// Creates a ring, or returns the step and errno that failed.
    static func create(entries: UInt32 = 8) -> Result<RingHandle, Errno> {
        var ring: OpaquePointer? = nil
        let ret = csupport_ring_create(entries, &ring)
        guard ret == 0, let ring else { return .failure(errnoFromNegative(ret)) }
        return .success(RingHandle(pointer: ring))
    }

    /// The CSUPPORT_OP_* bit set, or the errno of the probe.
    func probe() -> Result<Int32, Errno> {
        let ops = csupport_ring_probe(pointer)
        return ops < 0 ? .failure(errnoFromNegative(ops)) : .success(ops)
    }

    deinit { csupport_ring_destroy(pointer) }
}

struct URingOps: OptionSet {
    let rawValue: Int32
    static let read = URingOps(rawValue: Int32(CSUPPORT_OP_READ))
    static let readFixed = URingOps(rawValue: Int32(CSUPPORT_OP_READ_FIXED))
    static let recv = URingOps(rawValue: Int32(CSUPPORT_OP_RECV))
    static let pollAdd = URingOps(rawValue: Int32(CSUPPORT_OP_POLL_ADD))
}

/// The ring's sparse buffer table: one slot per registered block.
final class URingRegistrar: BlockRegistrar, @unchecked Sendable {
    // @unchecked Sendable: `register`/`unregister` are called only with the pool's mutex held
    // (MemoryPool's contract), which serializes every access to `freeSlots`; `failure` has its
    // own mutex because the reader reads it without the pool lock.
    let ring: RingHandle
    private var freeSlots: [Int32]
    private let failure = Mutex<Errno?>(nil)

    /// Registers a sparse table of `slots` entries; fails with the kernel's errno.
    init(ring: RingHandle, slots: Int) throws(Errno) {
        let ret = csupport_register_sparse(ring.pointer, UInt32(slots))
        if ret < 0 { throw errnoFromNegative(ret) }
        self.ring = ring
        self.freeSlots = (0..<Int32(slots)).reversed()
    }

    /// Why the last registration was refused (ENOMEM: RLIMIT_MEMLOCK), if one was.
    var lastFailure: Errno? { failure.withLock { $0 } }

    func register(_ block: Block) -> Int32? {
        // The kernel refuses registered buffers over 1 GiB.
        guard block.capacity <= 1 << 30, let slot = freeSlots.popLast() else { return nil }
        let ret = csupport_register_slot(ring.pointer, UInt32(slot), block.base, block.capacity)
        if ret < 0 {
            freeSlots.append(slot)
            failure.withLock { $0 = errnoFromNegative(ret) }
            return nil
        }
        return slot
    }

    func unregister(slot: Int32) {
        _ = csupport_register_slot(ring.pointer, UInt32(slot), nil, 0)
        freeSlots.append(slot)
    }
}

/// io_uring through CSupport: READ_FIXED into registered memory, READ otherwise, and one
/// RECV+MSG_WAITALL for large exact reads from sockets.
final class URingEngine: IOEngine {
    let ring: RingHandle
    let fd: FileDescriptor
    let isSocket: Bool
    /// Exact socket reads of at least this many bytes use one RECV+MSG_WAITALL.
    let waitAllThreshold: Int

    init(ring: RingHandle, fd: FileDescriptor, isSocket: Bool, waitAllThreshold: Int) {
        self.ring = ring
        self.fd = fd
        self.isSocket = isSocket
        self.waitAllThreshold = waitAllThreshold
    }

    var kind: ExactReader.Backend { .ioUring }

    func isReadableNow() -> Bool { pollNow(fd) }

    func read(
        into dst: UnsafeMutableRawBufferPointer,
        atLeast minimum: Int,
        slot: Int32,
        exact: Bool,
        statistics: inout ExactReader.Statistics
    ) -> (count: Int, error: Errno?) {
        var flags: UInt32 = 0
        var slot = slot
        if exact && isSocket && minimum >= waitAllThreshold {
            // RECV cannot target a registered slot; WAITALL replaces the READ_FIXED loop.
            flags |= UInt32(CSUPPORT_READ_RECV_WAITALL)
            slot = -1
        }
        var done = 0
        var submissions: UInt64 = 0
        let ret = csupport_read(
            ring.pointer, fd.rawValue, dst.baseAddress, dst.count, minimum, slot, flags, &done, &submissions)
        statistics.reads += Int(submissions)
        if slot >= 0 { statistics.fixedReads += Int(submissions) }
        return (done, ret < 0 ? errnoFromNegative(ret) : nil)
    }
}
