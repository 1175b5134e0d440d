// Region: the owner of a block while it is in use; gives it back to its pool on release.

/// The owner of one `Block` while it is in use: a staging buffer, a frame, or a view's memory.
///
/// Views (`ByteView`) and the reader hold `Region`s by reference; when the last reference goes,
/// `deinit` hands the block back to its pool (or frees it). The reader checks
/// `isKnownUniquelyReferenced` on its staging region before writing into it again: a region
/// that any view still references is never written to again.
///
/// A region holds memory only: never a ring or a descriptor (its pool drops the ring's
/// registrar when the reader closes).
final class Region: @unchecked Sendable {
    // @unchecked Sendable: `base` and `capacity` are immutable. `block` is mutated only by the
    // reader that owns the region (commit, decommit, registration), never by the views, which
    // only read bytes below what the reader handed out; `deinit` reads it after the last
    // release, which the reference count orders after every mutation.
    let base: UnsafeMutableRawPointer
    let capacity: Int
    /// Nil only during `deinit`.
    var block: Block?
    let pool: MemoryPool?
    /// Set when the kernel may still write into the memory (an io_uring request that could not
    /// be cancelled): the block is then never reused or unmapped.
    private(set) var isQuarantined = false

    init(block: consuming Block, pool: MemoryPool?) {
        self.base = block.base
        self.capacity = block.capacity
        self.block = consume block
        self.pool = pool
    }

    /// A region outside any pool and off the read path (`ByteView.init(_:)`, copies of partial
    /// bytes in errors): heap memory, freed on release.
    static func standalone(capacity: Int) throws(Errno) -> Region {
        Region(block: try Block.heap(capacity), pool: nil)
    }

    /// The registered slot of the memory, or -1.
    var slot: Int32 { block?.slot?.index ?? -1 }

    /// Bytes of the block known resident from its start (see `Block.resident`).
    var resident: Int { block?.resident ?? capacity }

    /// Faults in the block's pages up to `end` (see `Block.commit(upTo:)`).
    func commit(upTo end: Int) {
        block?.commit(upTo: end)
    }

    /// Gives the pages of `[start, end)` back to the system, unregistering the block first.
    /// Only the owning reader calls this, for pages no view can reference.
    func decommit(_ start: Int, _ end: Int, pool: MemoryPool) {
        guard block != nil else { return }
        pool.unregister(&block!)
        block?.decommit(start, end)
    }

    /// Never reuse or unmap this memory (see `isQuarantined`).
    func quarantine() { isQuarantined = true }

    deinit {
        guard let block = block.take() else { return }
        if isQuarantined {
            _ = block.disown()  // leaked on purpose: the kernel may still write into it
        } else if let pool {
            pool.giveBack(block)
        }  // else: dropping the block frees it
    }
}

import SystemPackage
