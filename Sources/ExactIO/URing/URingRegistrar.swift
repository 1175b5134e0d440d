#if EXACTIO_URING
import ExactIOCSupport
import Synchronization
import SystemPackage

// The ring's registered-buffer table, one slot per registered block.

/// The ring's sparse buffer table: one slot per registered block. Its own lock serializes the
/// slot list and the update syscalls; it may be called from any thread (a view released on
/// another thread returns its block, which may be unregistered then).
final class URingRegistrar: BlockRegistrar, Sendable {
    let ring: RingHandle
    private let freeSlots: Locked<[Int32]>

    /// Sparse table size: one slot per registered block (staging, frames, caller buffers).
    static let slots = 1024

    /// Registers a sparse table of `slots` entries; fails with the kernel's errno.
    init(ring: RingHandle, slots: Int = URingRegistrar.slots) throws(Errno) {
        let ret = csupport_register_sparse(ring.pointer, UInt32(slots))
        if ret < 0 { throw errnoFromNegative(ret) }
        self.ring = ring
        self.freeSlots = Locked((0..<Int32(slots)).reversed())
    }

    func register(base: UnsafeMutableRawPointer, count: Int) -> Result<RegisteredSlot, Errno> {
        // The kernel refuses registered buffers over 1 GiB.
        guard count <= 1 << 30 else { return .failure(.noBufferSpace) }
        return freeSlots.withLock { free in
            guard let slot = free.popLast() else { return .failure(.noBufferSpace) }
            let ret = csupport_register_slot(ring.pointer, UInt32(slot), base, count)
            if ret < 0 {
                free.append(slot)
                return .failure(errnoFromNegative(ret))
            }
            return .success(RegisteredSlot(index: slot))
        }
    }

    func unregister(_ slot: RegisteredSlot) {
        freeSlots.withLock { free in
            // In a child process the table is the parent's: leave it alone (csupport refuses).
            _ = csupport_register_slot(ring.pointer, UInt32(slot.index), nil, 0)
            free.append(slot.index)
        }
    }
}
#endif
