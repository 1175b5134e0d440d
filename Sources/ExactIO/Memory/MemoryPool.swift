import Synchronization
import SystemPackage

// MemoryPool: a reader's blocks (staging, frames), reused while warm, registered within the
// budget, and the registrar protocol the io_uring table implements.

/// Registers and unregisters memory in a ring's buffer table. Implemented by the io_uring
/// backend (`URingRegistrar`, which has its own lock); the POSIX backend has none.
protocol BlockRegistrar: AnyObject, Sendable {
    /// Registers `[base, base + count)` in a free slot, or returns the kernel's errno
    /// (`Errno.noMemory`: RLIMIT_MEMLOCK) or `Errno.noBufferSpace` (the table is full).
    func register(base: UnsafeMutableRawPointer, count: Int) -> Result<RegisteredSlot, Errno>
    /// Clears `slot`. May run on any thread.
    func unregister(_ slot: RegisteredSlot)
}

/// Why memory is not registered.
enum RegistrationRefusal: Sendable, Equatable {
    /// No registered-buffer table (POSIX, or the ring could not register one).
    case noTable
    /// Over `Options.registeredMemoryLimit`.
    case overReaderLimit(Int)
    /// Over the process-wide budget (`RegistrationBudget`).
    case overProcessBudget
    /// The kernel refused (ENOMEM: RLIMIT_MEMLOCK, shared by the user's processes).
    case kernel(Errno)
}

/// A bounded pool of blocks for one reader (or loop), shared with the views it handed out.
///
/// Faulting in fresh pages for every large frame halves throughput on our machines, so
/// released blocks are kept for the next frame: up to `retainBytes` of free blocks, and always
/// the most recently released one whatever its size (a reader of 512 MiB frames keeps one
/// 512 MiB block, which it needs for its next frame anyway). A pooled block keeps its
/// registration while pooled.
///
/// Thread safety: `give` runs wherever the last view of a block is released. All state is
/// behind one mutex, held only for list and counter updates: mapping, faulting in,
/// registering and unmapping happen outside it.
final class MemoryPool: Sendable {
    private struct State {
        var free: [Block.Parts] = []  // oldest first
        var freeBytes = 0
        var liveBlocks = 0  // mapped and not yet unmapped (in use or free)
        var registeredBytes = 0  // this pool's share of the process-wide budget
        /// Nil once closed: views then hold memory only, never the ring.
        var registrar: (any BlockRegistrar)?
        var closed = false
        var lastRefusal: RegistrationRefusal? = nil
        var externalBytes: [Int32: Int] = [:]  // caller memory registered, by slot
        /// Test seam: asked before each new mapping; false fails it with ENOMEM.
        var allocationFilter: (@Sendable (Int) -> Bool)? = nil
    }

    let retainBytes: Int
    /// `Options.registeredMemoryLimit`: this pool's cap, under the process-wide budget.
    let registrationLimit: Int?
    private let state: Locked<State>

    init(registrar: (any BlockRegistrar)?, registrationLimit: Int?, retainBytes: Int = 64 << 20) {
        self.retainBytes = retainBytes
        self.registrationLimit = registrationLimit
        var s = State()
        s.registrar = registrar
        if registrar == nil { s.lastRefusal = .noTable }
        self.state = Locked(s)
    }

    var hasRegistrar: Bool { state.withLock { $0.registrar != nil } }

    /// Test seam (fuzzing, fault tests): asked before each new mapping with its size; false
    /// makes the mapping fail with `Errno.noMemory`.
    var allocationFilter: (@Sendable (Int) -> Bool)? {
        get { state.withLock { $0.allocationFilter } }
        set { state.withLock { $0.allocationFilter = newValue } }
    }

    /// Why the last registration did not happen, if it did not.
    var lastRefusal: RegistrationRefusal? { state.withLock { $0.lastRefusal } }

    // MARK: - Taking and giving

    /// A block of at least `bytes`: a pooled one that fits (its resident pages and its
    /// registration come with it), or a fresh mapping with nothing resident.
    /// - Throws: `Errno.noMemory` (or mmap's errno) when the memory cannot be mapped.
    func take(atLeast bytes: Int) throws(Errno) -> Block {
        let wanted = try Block.roundedCapacity(bytes)
        // Accept a pooled block somewhat larger than wanted (a quarter, or one huge page), never
        // a 512 MiB block for a 4 KiB need.
        let slack = max(wanted / 4, Block.hugePageSize)
        let acceptable = wanted > Int.max - slack ? Int.max : wanted + slack
        let pooled: Block.Parts? = state.withLock { s in
            var best: Int? = nil
            for (i, b) in s.free.enumerated() where b.capacity >= wanted && b.capacity <= acceptable {
                if best == nil || b.capacity < s.free[best!].capacity { best = i }
            }
            guard let best else { return nil }
            let parts = s.free.remove(at: best)
            s.freeBytes -= parts.capacity
            return parts
        }
        if let pooled { return Block(adopting: pooled) }
        if let filter = allocationFilter, !filter(wanted) { throw .noMemory }
        let block = try Block.map(atLeast: wanted)
        state.withLock { $0.liveBlocks += 1 }
        return block
    }

    /// A region of at least `bytes`, every page resident and (with `register`) registered
    /// while the budget allows: staging buffers and `reserve(_:)`.
    func residentRegion(atLeast bytes: Int, register: Bool) throws(Errno) -> Region {
        var block = try take(atLeast: bytes)
        block.commit(upTo: block.capacity)
        if register && block.slot == nil { _ = self.register(&block) }
        return Region(block: block, pool: self)
    }

    /// Returns a block that nothing references any more. Kept for the next frame within the
    /// retention bound; otherwise unregistered and unmapped (outside the lock).
    func giveBack(_ block: consuming Block) {
        var parts: Block.Parts? = block.disown()
        var evicted: [Block.Parts] = []
        let registrar: (any BlockRegistrar)? = state.withLock { s in
            if !s.closed {
                s.free.append(parts.take()!)
                s.freeBytes += s.free.last!.capacity
                // Evict the oldest free blocks past the bound, but keep the newest.
                while s.freeBytes > retainBytes && s.free.count > 1 {
                    let old = s.free.removeFirst()
                    s.freeBytes -= old.capacity
                    evicted.append(old)
                }
            }
            s.liveBlocks -= evicted.count + (parts == nil ? 0 : 1)
            return s.registrar
        }
        if let parts { evicted.append(parts) }
        for p in evicted { release(Block(adopting: p), registrar: registrar) }
    }

    /// Unregisters (when the ring is still ours) and frees. Called without the lock.
    private func release(_ block: consuming Block, registrar: (any BlockRegistrar)?) {
        if let slot = block.slot {
            block.slot = nil
            if let registrar {
                registrar.unregister(slot)
                uncount(block.capacity)
            }
            // Else the pool is closed: the ring is gone (or going) with every registration, and
            // `close` returned this pool's share of the budget.
        }
        _ = consume block  // unmapped here
    }

    private func uncount(_ bytes: Int) {
        state.withLock { s in
            s.registeredBytes -= bytes
            if s.lastRefusal != .noTable { s.lastRefusal = nil }
        }
        RegistrationBudget.shared.release(bytes)
    }

    // MARK: - Registration

    /// Registers `block` (which must be wholly resident) within this pool's limit and the
    /// process-wide budget. Returns false, with the reason in `lastRefusal`, when it is not.
    @discardableResult
    func register(_ block: inout Block) -> Bool {
        guard block.slot == nil else { return true }
        guard block.isMapped, block.resident == block.capacity else { return false }
        guard let slot = registerWithinBudget(base: block.base, count: block.capacity) else { return false }
        block.slot = slot
        return true
    }

    /// Claims `count` bytes of the budgets and registers the memory; on a refusal, the claim is
    /// returned and the reason kept in `lastRefusal`.
    private func registerWithinBudget(base: UnsafeMutableRawPointer, count: Int) -> RegisteredSlot? {
        guard let registrar = claim(count) else { return nil }
        switch registrar.register(base: base, count: count) {
        case .success(let slot):
            return slot
        case .failure(let e):
            state.withLock { s in
                s.registeredBytes -= count
                s.lastRefusal = .kernel(e)
            }
            RegistrationBudget.shared.release(count)
            return nil
        }
    }

    /// Claims `bytes` of this pool's limit and of the process budget; the registrar on success.
    private func claim(_ bytes: Int) -> (any BlockRegistrar)? {
        state.withLock { s -> (any BlockRegistrar)? in
            guard let registrar = s.registrar else {
                s.lastRefusal = .noTable
                return nil
            }
            if let limit = registrationLimit, bytes > limit - s.registeredBytes {
                s.lastRefusal = .overReaderLimit(limit)
                return nil
            }
            guard RegistrationBudget.shared.claim(bytes) else {
                s.lastRefusal = .overProcessBudget
                return nil
            }
            s.registeredBytes += bytes
            return registrar
        }
    }

    /// Unregisters `block` now (before its pages are given back, or while views keep it).
    func unregister(_ block: inout Block) {
        guard let slot = block.slot else { return }
        block.slot = nil
        let registrar = state.withLock { $0.registrar }
        guard let registrar else { return }
        registrar.unregister(slot)
        uncount(block.capacity)
    }

    // MARK: - Life cycle

    /// Frees the pooled (free) blocks now; blocks in use are untouched.
    func trim() {
        let (free, registrar) = state.withLock { s -> ([Block.Parts], (any BlockRegistrar)?) in
            let f = s.free
            s.free.removeAll()
            s.freeBytes = 0
            s.liveBlocks -= f.count
            return (f, s.registrar)
        }
        for p in free { release(Block(adopting: p), registrar: registrar) }
    }

    /// Frees every pooled block and lets go of the registrar (and so of the ring): blocks still
    /// in use by views are freed when released, as plain memory. Called when the reader goes.
    func close() {
        trim()
        let share = state.withLock { s -> Int in
            s.closed = true
            s.registrar = nil
            let share = s.registeredBytes
            s.registeredBytes = 0
            s.externalBytes = [:]
            return share
        }
        // The ring's teardown unpins every registration it still has.
        RegistrationBudget.shared.release(share)
    }

    deinit {
        // Normally closed already (the reader closes the pool); free anything left all the same.
        trim()
    }

    // MARK: - Caller memory

    /// Registers caller-owned memory in a free slot (within the budgets); nil when not possible.
    func registerExternal(base: UnsafeMutableRawPointer, count: Int) -> RegisteredSlot? {
        guard let slot = registerWithinBudget(base: base, count: count) else { return nil }
        state.withLock { $0.externalBytes[slot.index] = count }
        return slot
    }

    func unregisterExternal(_ slot: RegisteredSlot) {
        let (registrar, count) = state.withLock { s in (s.registrar, s.externalBytes.removeValue(forKey: slot.index)) }
        guard let registrar, let count else { return }
        registrar.unregister(slot)
        uncount(count)
    }

    /// Counters for tests and diagnostics.
    var snapshot: (liveBlocks: Int, freeBlocks: Int, freeBytes: Int, registeredBytes: Int) {
        state.withLock { s in (s.liveBlocks, s.free.count, s.freeBytes, s.registeredBytes) }
    }
}
