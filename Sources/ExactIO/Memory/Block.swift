import SystemPackage

// Block: one allocation (mapped or heap) with what is resident and where it is registered.

/// A slot in an io_uring ring's registered-buffer table, held by the block registered in it.
struct RegisteredSlot: Hashable, Sendable {
    let index: Int32
}

/// One anonymous mapping (or a small heap allocation), the unit of memory ExactIO reads into.
///
/// A `Block` has exactly one owner at a time (it is `~Copyable`): a `Region` while in use, the
/// `MemoryPool`'s free list while pooled. Dropping it returns its memory to the system.
///
/// Memory is committed as bytes arrive, not when a block is mapped: `map` reserves address
/// space only, `commit(upTo:)` faults pages in ahead of the data (one `MADV_POPULATE_WRITE`
/// call, faster than faulting page by page inside the kernel's copy), and `decommit` gives
/// pages that no view can reference back to the system (`MADV_DONTNEED`). A block is
/// registered with io_uring only while every page of it is resident (registration pins, and so
/// commits, the whole block).
struct Block: ~Copyable {
    /// Start of the memory. Invariant: valid for `capacity` bytes until the block is dropped;
    /// page-aligned for mapped blocks, 16-byte aligned for heap blocks.
    let base: UnsafeMutableRawPointer
    /// Bytes mapped (a multiple of the page size, of 2 MiB for huge blocks) or allocated.
    let capacity: Int
    /// True for `mmap`ed blocks, false for `heap(_:)` ones (never registered, never decommitted).
    let isMapped: Bool
    /// A lower bound of the prefix known to be resident: `[0, resident)` was populated or
    /// written and not decommitted since. Registration requires `resident == capacity`.
    private(set) var resident: Int
    /// Where the block is registered, if it is.
    var slot: RegisteredSlot?

    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    /// MADV_POPULATE_WRITE (Linux 5.14), spelled out: Glibc's headers here predate it.
    static let madvPopulateWrite: Int32 = 23
    static let hugePageSize = 2 << 20

    /// What a pooled block is while it has no owner: the pool stores these and re-adopts them.
    struct Parts: @unchecked Sendable {
        // @unchecked Sendable: a description of memory no one references (pooled, under the
        // pool's lock); whoever adopts it becomes its only owner.
        let base: UnsafeMutableRawPointer
        let capacity: Int
        let isMapped: Bool
        let resident: Int
        let slot: RegisteredSlot?
    }

    private init(base: UnsafeMutableRawPointer, capacity: Int, isMapped: Bool, resident: Int) {
        self.base = base
        self.capacity = capacity
        self.isMapped = isMapped
        self.resident = resident
        self.slot = nil
    }

    /// Takes ownership of pooled memory again.
    init(adopting parts: Parts) {
        self.base = parts.base
        self.capacity = parts.capacity
        self.isMapped = parts.isMapped
        self.resident = parts.resident
        self.slot = parts.slot
    }

    /// Gives up ownership without freeing: the pool keeps the parts.
    consuming func disown() -> Parts {
        let parts = Parts(base: base, capacity: capacity, isMapped: isMapped, resident: resident, slot: slot)
        discard self
        return parts
    }

    /// The capacity a request of `bytes` is rounded up to; `Errno.noMemory` when no mapping
    /// of that size can exist.
    static func roundedCapacity(_ bytes: Int) throws(Errno) -> Int {
        let unit = bytes >= hugePageSize ? hugePageSize : pageSize
        let (sum, overflow) = max(bytes, 1).addingReportingOverflow(unit - 1)
        if overflow { throw .noMemory }
        return sum / unit * unit
    }

    static func roundUpToPage(_ bytes: Int) -> Int {
        (bytes + pageSize - 1) & ~(pageSize - 1)
    }

    /// Maps a block of at least `bytes` (address space only: nothing is resident yet).
    /// Throws `Errno.noMemory` (or mmap's errno) when the system refuses, for example a size
    /// beyond RAM + swap, or past RLIMIT_AS: never traps.
    static func map(atLeast bytes: Int) throws(Errno) -> Block {
        let capacity = try roundedCapacity(bytes)
        guard let raw = mmap(nil, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | Platform.mapAnonymous, -1, 0),
              raw != MAP_FAILED
        else { throw Errno(rawValue: errno) }
        #if os(Linux)
        if capacity >= hugePageSize {
            // Small pages until the block is full: with transparent huge pages set to
            // "always", one byte of data would otherwise commit 2 MiB. `commit` advises huge
            // pages once the whole block is resident.
            _ = madvise(raw, capacity, MADV_NOHUGEPAGE)
        }
        #endif
        return Block(base: raw, capacity: capacity, isMapped: true, resident: 0)
    }

    /// A heap block (never registered), for memory off the read path: copies in errors and
    /// `ByteView(_:)`. Throws `Errno.noMemory` when malloc fails.
    static func heap(_ bytes: Int) throws(Errno) -> Block {
        let capacity = max(bytes, 1)
        guard let base = malloc(capacity) else { throw .noMemory }
        return Block(base: base, capacity: capacity, isMapped: false, resident: capacity)
    }

    /// Faults in the pages of `[resident, end)` (rounded to pages, capped at the capacity) in
    /// one call, ahead of the bytes that will land there. A refusal (old kernels, memory
    /// pressure) is ignored: the kernel then faults pages in as it writes them.
    mutating func commit(upTo end: Int) {
        guard isMapped else { return }
        let target = min(capacity, Block.roundUpToPage(end))
        guard target > resident else { return }
        #if os(Linux)
        _ = madvise(base + resident, target - resident, Block.madvPopulateWrite)
        #endif
        resident = target
        #if os(Linux)
        if resident == capacity && capacity >= Block.hugePageSize {
            // Huge pages for a block that is now full, where the kernel allows: advised after
            // populating, so that khugepaged collapses them in the background (advised before,
            // the populate compacts memory synchronously and stalled reads for up to a second).
            _ = madvise(base, capacity, MADV_HUGEPAGE)
        }
        #endif
    }

    /// Gives the pages of `[start, end)` that lie wholly inside the range back to the system.
    /// Reading them afterwards gives zeros; nothing may reference them. The block must not be
    /// registered (pinned pages would stay resident).
    mutating func decommit(_ start: Int, _ end: Int) {
        guard isMapped else { return }
        precondition(slot == nil, "decommit of registered memory")
        let from = Block.roundUpToPage(start)
        let to = min(end, capacity) & ~(Block.pageSize - 1)
        guard to > from else { return }
        #if os(Linux)
        _ = madvise(base + from, to - from, MADV_DONTNEED)
        #else
        // Elsewhere MADV_DONTNEED is only advice (Darwin keeps the pages and their bytes): fresh
        // anonymous pages mapped over the range give the memory back for certain.
        _ = mmap(base + from, to - from, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | Platform.mapAnonymous, -1, 0)
        #endif
        resident = min(resident, from)
    }

    deinit {
        if isMapped {
            munmap(base, capacity)
        } else {
            free(base)
        }
    }
}
