/// The owner of one `Block` while it is in use: a staging buffer, a frame, or a view's memory.
///
/// Views (`ByteView`) and the reader hold `Region`s by reference; when the last reference goes,
/// `deinit` hands the block back to its pool (or unmaps it). The reader checks
/// `isKnownUniquelyReferenced` on its staging region before writing into it again: a region
/// that any view still references is never written to again.
final class Region: @unchecked Sendable {
    // @unchecked Sendable: `block` is immutable; the pool it returns to is thread-safe.
    let block: Block
    let pool: MemoryPool?

    init(block: Block, pool: MemoryPool?) {
        self.block = block
        self.pool = pool
    }

    /// A region outside any pool and off the read path (`ByteView.init(_:)`, copies of partial
    /// bytes in errors): heap memory, freed on release.
    static func standalone(capacity: Int) -> Region {
        Region(block: Block.heap(capacity), pool: nil)
    }

    var capacity: Int { block.capacity }
    var base: UnsafeMutableRawPointer { block.base }
    var slot: Int32 { block.slot }

    deinit {
        if let pool {
            pool.give(block)
        } else {
            block.free()
        }
    }
}
