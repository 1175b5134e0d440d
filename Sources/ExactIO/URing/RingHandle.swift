#if EXACTIO_URING
import ExactIOCSupport
import Synchronization
import SystemPackage

// One io_uring ring, as the blocking reader's engine and the event loop's backend both hold it:
// created, probed, checked usable (fork, broken) and destroyed here.

/// Owns a `csupport_ring`. Shared by the engine (submissions, reader's thread) and the
/// registrar (slot updates), so the ring lives until both are gone. Views never reach it.
final class RingHandle: @unchecked Sendable {
    // @unchecked Sendable: submissions happen only from the reader's owner (the reader is not
    // Sendable); the registrar's updates are serialized by its own lock, and the kernel
    // serializes register syscalls against submissions.
    let pointer: OpaquePointer

    private init(pointer: OpaquePointer) {
        self.pointer = pointer
        RegistrationBudget.shared.openRings.add(1, ordering: .relaxed)
    }

    /// Creates a ring, or returns the errno that failed.
    static func create(entries: UInt32 = 8, flags: UInt32 = 0) -> Result<RingHandle, Errno> {
        var ring: OpaquePointer? = nil
        let ret = csupport_ring_create(entries, flags, &ring)
        guard ret == 0, let ring else { return .failure(errnoFromNegative(ret)) }
        return .success(RingHandle(pointer: ring))
    }

    /// The CSUPPORT_OP_* bit set, or the errno of the probe.
    func probe() -> Result<Int32, Errno> {
        let ops = csupport_ring_probe(pointer)
        return ops < 0 ? .failure(errnoFromNegative(ops)) : .success(ops)
    }

    /// nil when this process may submit; else why not (`Errno.fileDescriptorInBadState`:
    /// inherited through fork(); `Errno.notRecoverable`: broken).
    var unusable: Errno? {
        let r = csupport_ring_usable(pointer)
        return r == 0 ? nil : errnoFromNegative(r)
    }

    deinit {
        csupport_ring_destroy(pointer)
        RegistrationBudget.shared.openRings.subtract(1, ordering: .relaxed)
    }
}

extension Errno {
    /// EBADFD, which swift-system does not name: ExactIOCSupport's "the ring was inherited through
    /// fork()".
    static var fileDescriptorInBadState: Errno { Errno(rawValue: EBADFD) }
}

struct URingOps: OptionSet {
    let rawValue: Int32
    static let read = URingOps(rawValue: Int32(CSUPPORT_OP_READ))
    static let readFixed = URingOps(rawValue: Int32(CSUPPORT_OP_READ_FIXED))
    static let recv = URingOps(rawValue: Int32(CSUPPORT_OP_RECV))
    static let pollAdd = URingOps(rawValue: Int32(CSUPPORT_OP_POLL_ADD))
    static let linkTimeout = URingOps(rawValue: Int32(CSUPPORT_OP_LINK_TIMEOUT))
    static let asyncCancel = URingOps(rawValue: Int32(CSUPPORT_OP_ASYNC_CANCEL))
    static let accept = URingOps(rawValue: Int32(CSUPPORT_OP_ACCEPT))
    static let send = URingOps(rawValue: Int32(CSUPPORT_OP_SEND))
    static let sendmsg = URingOps(rawValue: Int32(CSUPPORT_OP_SENDMSG))
    static let sendZC = URingOps(rawValue: Int32(CSUPPORT_OP_SEND_ZC))
    static let sendmsgZC = URingOps(rawValue: Int32(CSUPPORT_OP_SENDMSG_ZC))
}
#endif
