import Synchronization

/// Registers and unregisters blocks in a ring's buffer table. Implemented by the io_uring
/// backend; the POSIX backend has none.
protocol BlockRegistrar: AnyObject, Sendable {
    /// Registers `block` in a free slot; returns the slot, or nil when the table is full or the
    /// kernel refused (the reason goes to `registrationFailure`). Called with the pool locked.
    func register(_ block: Block) -> Int32?
    /// Clears `slot`. Called with the pool locked, possibly on another thread than the reader's.
    func unregister(slot: Int32)
}

/// A bounded pool of blocks for one reader, shared with the views it handed out.
///
/// Faulting in fresh pages for every large frame halves throughput on our machines, so
/// released blocks are kept for the next frame: up to `retainBytes` of free blocks, and always
/// the most recently released one whatever its size (a reader of 512 MiB frames keeps one
/// 512 MiB block, which it needs for its next frame anyway). Blocks are registered with the
/// ring once, when mapped, while the registration budget lasts, and stay registered while
/// pooled.
///
/// Thread safety: `give` runs wherever the last view of a block is released; all state is
/// behind one mutex.
final class MemoryPool: Sendable {
    struct State: Sendable {
        var free: [Block] = []  // oldest first
        var freeBytes = 0
        var liveBlocks = 0  // mapped and not yet unmapped (in use or free)
        var registeredBytes = 0
        var registrationBudget: Int
        var registrationPaused = false  // set after a refusal; cleared when budget frees up
        var closed = false
        var externalBytes: [Int32: Int] = [:]  // caller memory registered by slot
    }

    let registrar: BlockRegistrar?
    let retainBytes: Int
    private let state: Mutex<State>

    init(registrar: BlockRegistrar?, registrationBudget: Int, retainBytes: Int = 64 << 20) {
        self.registrar = registrar
        self.retainBytes = retainBytes
        self.state = Mutex(State(registrationBudget: registrar == nil ? 0 : registrationBudget))
    }

    /// A region of at least `bytes`, from the free list when a block fits, else newly mapped.
    func region(atLeast bytes: Int) -> Region {
        Region(block: take(atLeast: bytes), pool: self)
    }

    private func take(atLeast bytes: Int) -> Block {
        let wanted = Block.roundedCapacity(bytes)
        // Accept a free block up to twice the size wanted (plus one huge page), never a
        // 512 MiB block for a 4 KiB need: its pages are resident and would be wasted.
        let acceptable = wanted.multipliedReportingOverflow(by: 2).partialValue + Block.hugePageSize
        return state.withLock { s in
            var best: Int? = nil
            for (i, b) in s.free.enumerated() where b.capacity >= wanted && b.capacity <= acceptable {
                if best == nil || b.capacity < s.free[best!].capacity { best = i }
            }
            if let best {
                let block = s.free.remove(at: best)
                s.freeBytes -= block.capacity
                return block
            }
            var block = Block.map(atLeast: wanted)
            s.liveBlocks += 1
            if let registrar, !s.registrationPaused,
               s.registeredBytes + block.capacity <= s.registrationBudget {
                if let slot = registrar.register(block) {
                    block.slot = slot
                    s.registeredBytes += block.capacity
                } else {
                    s.registrationPaused = true
                }
            }
            return block
        }
    }

    /// Returns a block that nothing references any more.
    func give(_ block: Block) {
        state.withLock { s in
            if s.closed {
                release(block, &s)
                return
            }
            s.free.append(block)
            s.freeBytes += block.capacity
            // Evict the oldest free blocks past the bound, but keep the newest.
            while s.freeBytes > retainBytes && s.free.count > 1 {
                let old = s.free.removeFirst()
                s.freeBytes -= old.capacity
                release(old, &s)
            }
        }
    }

    private func release(_ block: Block, _ s: inout State) {
        if block.slot >= 0, let registrar {
            registrar.unregister(slot: block.slot)
            s.registeredBytes -= block.capacity
            s.registrationPaused = false
        }
        block.free()
        s.liveBlocks -= 1
    }

    deinit {
        // Normally empty (the reader closes the pool); unmap anything left all the same.
        trim()
    }

    /// Frees the pooled (free) blocks now; blocks in use are untouched.
    func trim() {
        state.withLock { s in
            for block in s.free { release(block, &s) }
            s.free.removeAll()
            s.freeBytes = 0
        }
    }

    /// Frees every pooled block; blocks still in use are freed when released. Called when the
    /// reader goes away.
    func close() {
        state.withLock { $0.closed = true }
        trim()
    }

    /// Registers caller-owned memory in a free slot (within the budget); nil when not possible.
    func registerExternal(base: UnsafeMutableRawPointer, count: Int) -> Int32? {
        guard let registrar else { return nil }
        return state.withLock { s in
            guard s.registeredBytes + count <= s.registrationBudget,
                  let slot = registrar.register(Block(base: base, capacity: count, slot: -1))
            else { return nil }
            s.registeredBytes += count
            s.externalBytes[slot] = count
            return slot
        }
    }

    func unregisterExternal(slot: Int32) {
        guard let registrar else { return }
        state.withLock { s in
            guard let count = s.externalBytes.removeValue(forKey: slot) else { return }
            registrar.unregister(slot: slot)
            s.registeredBytes -= count
            s.registrationPaused = false
        }
    }

    /// Counters for tests and diagnostics.
    var snapshot: (liveBlocks: Int, freeBlocks: Int, freeBytes: Int, registeredBytes: Int) {
        state.withLock { s in (s.liveBlocks, s.free.count, s.freeBytes, s.registeredBytes) }
    }
}
