import Glibc

/// One page-aligned anonymous mapping, the unit of memory ExactIO reads into.
///
/// A `Block` is a plain value: who owns it is decided by `Region` (in use) and `MemoryPool`
/// (free). Memory comes from `mmap`, so it is page-aligned (the kernel copies fastest into
/// aligned memory, and registration pins whole pages) and zero pages cost nothing until
/// touched. Blocks of 2 MiB and more ask for transparent huge pages.
struct Block: @unchecked Sendable {
    // @unchecked Sendable: a plain description of a mapping; which thread may touch the memory
    // is decided by its owner (Region while in use, MemoryPool under its mutex while free).
    /// Start of the mapping. Invariant: valid for `capacity` bytes until `free()`.
    let base: UnsafeMutableRawPointer
    /// Bytes mapped; a multiple of the page size (of 2 MiB for huge blocks).
    let capacity: Int
    /// Index in the ring's registered-buffer table, or -1 when not registered.
    var slot: Int32
    /// True for `mmap`ed blocks (the pool's), false for `heap(_:)` ones.
    var mapped = true

    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    /// MADV_POPULATE_WRITE (Linux 5.14), spelled out: Glibc's headers here predate it.
    static let madvPopulateWrite: Int32 = 23
    static let hugePageSize = 2 << 20

    /// The capacity a request of `bytes` is rounded up to.
    static func roundedCapacity(_ bytes: Int) -> Int {
        let unit = bytes >= hugePageSize ? hugePageSize : pageSize
        let (sum, overflow) = max(bytes, 1).addingReportingOverflow(unit - 1)
        precondition(!overflow, "allocation of \(bytes) bytes is too large")
        return sum / unit * unit
    }

    /// Maps a new block of at least `bytes`. Traps only when the system has no memory left
    /// to map, the same as any allocation.
    static func map(atLeast bytes: Int) -> Block {
        let capacity = roundedCapacity(bytes)
        guard let raw = mmap(nil, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != MAP_FAILED
        else {
            fatalError("ExactIO: mmap of \(capacity) bytes failed: errno \(errno)")
        }
        // Every block is about to be filled by the kernel: fault it in now, in one call,
        // rather than page by page inside the read's copy (Linux 5.14+; older kernels refuse
        // the advice and the pages fault on first touch as usual).
        _ = madvise(raw, capacity, Block.madvPopulateWrite)
        if capacity >= hugePageSize {
            // Huge pages for big blocks, where the kernel allows: advised after populating so
            // that khugepaged collapses them in the background. Advised before, the populate
            // compacts memory synchronously and stalled reads for up to a second here.
            _ = madvise(raw, capacity, MADV_HUGEPAGE)
        }
        return Block(base: raw, capacity: capacity, slot: -1)
    }

    /// A small heap block, never registered, for memory off the read path.
    static func heap(_ bytes: Int) -> Block {
        let capacity = max(bytes, 1)
        let base = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        return Block(base: base, capacity: capacity, slot: -1, mapped: false)
    }

    /// Returns the memory to the system. The caller guarantees nothing references it any more
    /// (and that it was unregistered, or the ring is gone).
    func free() {
        if mapped {
            munmap(base, capacity)
        } else {
            base.deallocate()
        }
    }
}
