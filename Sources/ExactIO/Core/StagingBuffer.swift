import SystemPackage

// The blocking reader's buffer: one staging region read into with read-ahead, whose consumed
// bytes stay valid for the views that reference them (StagingChunk owners).

/// The read-ahead buffer: bytes the kernel delivered that no read has consumed yet.
///
/// This is the I/O-free core of a reader: it knows what is buffered and which memory the next
/// bytes go to, and never waits for anything, so a blocking reader and an event loop can
/// drive the same logic. Layout of `region`:
///
///     [0, readIndex)           consumed; may be referenced by views handed out
///     [readIndex, writeIndex)  buffered, not yet consumed
///     [writeIndex, capacity)   free: the next read lands here
///
/// The one rule that makes views immutable: bytes below `writeIndex` are written again only
/// when no view references the region (`isKnownUniquelyReferenced`); otherwise the region
/// is retired to its views and the buffered bytes move to a fresh one. A retired region keeps
/// only the pages views can reference (per-chunk owners say which): the rest goes
/// back to the system at once, so a kept 10-byte view costs a page, not the whole buffer.
/// Keeps part of a staging region alive for the views that own it.
///
/// Views of staging memory own a chunk, not the whole region: when the region is retired,
/// the chunks whose owner is still referenced by a view are kept, and every other page goes
/// back to the system. Each chunk has two owners: one for the views that lie inside it, one
/// for the view that starts in it and runs into later chunks (views are consecutive and do not
/// overlap, so there is at most one such view per chunk, and the pages it keeps are exactly
/// its own). Owners are reused while no view holds them: in steady state a view costs one
/// retain and no allocation.
final class StagingChunk: @unchecked Sendable {
    // @unchecked Sendable: `region` is immutable; `end` is read and written only by the reader
    // that owns the staging buffer (views never touch it).
    let region: Region
    /// End (exclusive offset in the region) of the view that crosses out of the chunk (for a
    /// crossing owner). Unchecked exclusivity: only the owning reader touches it, never
    /// re-entrantly (no dynamic check per view on the fast path).
    @exclusivity(unchecked) var end = 0

    init(region: Region) { self.region = region }
}

struct StagingBuffer: CoreBuffer {
    private(set) var region: Region {
        didSet { base = region.base }
    }
    /// `region.base`, kept here: the fast path reads it per frame without a pointer chase.
    private(set) var base: UnsafeMutableRawPointer
    private(set) var readIndex = 0
    private(set) var writeIndex = 0
    /// The configured capacity; `region` may be larger for a while after an error stashed a
    /// partially read frame in it.
    let nominalCapacity: Int
    let pool: MemoryPool
    /// The owners of the chunks of `region` that views were handed out from: entry 2i owns the
    /// views inside chunk i = `[i << chunkShift, (i + 1) << chunkShift)`, entry 2i + 1 the view
    /// that starts in chunk i and crosses out of it. An owner referenced by nothing but this
    /// array has no view left.
    private var chunks: [StagingChunk?]
    /// log2 of the chunk size: at least a page, and at most 64 chunks per region.
    private var chunkShift: Int

    init(pool: MemoryPool, capacity: Int) throws(Errno) {
        self.pool = pool
        self.nominalCapacity = try Block.roundedCapacity(capacity)
        let region = try pool.residentRegion(atLeast: nominalCapacity, register: true)
        self.region = region
        self.base = region.base
        self.chunkShift = StagingBuffer.chunkShift(for: region.capacity)
        self.chunks = StagingBuffer.noChunks(region.capacity, chunkShift)
    }

    static func noChunks(_ capacity: Int, _ shift: Int) -> [StagingChunk?] {
        Array(repeating: nil, count: 2 * ((capacity + (1 << shift) - 1) >> shift))
    }

    static func chunkShift(for capacity: Int) -> Int {
        var shift = Block.pageSize.trailingZeroBitCount
        while capacity > 64 << shift { shift += 1 }
        return shift
    }

    var buffered: Int { writeIndex - readIndex }

    /// The buffered bytes. Valid until the next mutating call.
    var readable: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base + readIndex, count: buffered)
    }

    /// The free tail, where the next read lands. Valid until the next mutating call.
    var writable: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: region.base + writeIndex, count: region.capacity - writeIndex)
    }

    var contiguousReadable: UnsafeRawBufferPointer { readable }

    @inline(__always)
    mutating func viewInPlace(_ count: Int) -> ByteView { consumeView(count) }

    @inline(__always)
    func byte(at i: Int) -> UInt8 {
        region.base.load(fromByteOffset: readIndex + i, as: UInt8.self)
    }

    /// A view of the next `count` buffered bytes, consuming them: always in place (staging is
    /// contiguous).
    @inline(__always)
    mutating func view(_ count: Int) throws(Errno) -> (ByteView, copied: Int) {
        (consumeView(count), 0)
    }

    mutating func copyOut(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        let n = min(max, buffered)
        if n > 0 {
            dst.copyMemory(from: region.base + readIndex, byteCount: n)
            readIndex += n
        }
        return n
    }

    /// A view of the next `count` buffered bytes, consuming them (no copy; in steady state no
    /// allocation either, and one retain).
    @inline(__always)
    mutating func consumeView(_ count: Int) -> ByteView {
        precondition(count > 0 && count <= buffered)
        let start = readIndex
        readIndex += count
        return ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base + start, count: count),
                        owner: owner(start, readIndex))
    }

    /// The owner of consumed bytes `[start, end)` of the region, for a view of them (views
    /// are consecutive and never overlap, so the chunk scheme above holds). Reused while one
    /// exists.
    @inline(__always)
    private mutating func owner(_ start: Int, _ end: Int) -> StagingChunk {
        let first = start >> chunkShift
        let crossing = first != (end - 1) >> chunkShift
        let i = crossing ? 2 * first + 1 : 2 * first
        let owner: StagingChunk
        if let existing = chunks[i] {
            owner = existing
        } else {
            owner = StagingChunk(region: region)
            chunks[i] = owner
        }
        if crossing { owner.end = end }  // only a crossing owner's end is ever read
        return owner
    }

    /// An owner for bytes already consumed without a view (lent to a closure in place), when
    /// the reader is about to be used while they are lent: holding it keeps the bytes where
    /// they are (staging is then never written below them, nor released). Nil when the bytes
    /// do not lie in the current region (nothing can move them then).
    mutating func pin(_ bytes: UnsafeRawBufferPointer) -> AnyObject? {
        guard let p = bytes.baseAddress, bytes.count > 0, p >= UnsafeRawPointer(region.base),
              p + bytes.count <= UnsafeRawPointer(region.base + readIndex)
        else { return nil }
        let start = p - UnsafeRawPointer(region.base)
        return owner(start, start + bytes.count)
    }

    @inline(__always)
    mutating func consume(_ count: Int) {
        precondition(count <= buffered)
        readIndex &+= count
    }

    /// Records `count` bytes the kernel wrote at `writable`.
    mutating func commit(_ count: Int) {
        precondition(count <= region.capacity - writeIndex)
        writeIndex += count
    }

    /// Makes sure at least `need` bytes can be appended and that the free tail is worth a
    /// read (at least an eighth of the capacity), moving the buffered bytes to the front of
    /// this region (when nothing references it) or of a fresh one (when views do).
    /// Returns the number of bytes copied (at most the buffered count).
    /// - Throws: `Errno.noMemory` when a fresh region cannot be mapped (nothing changes then).
    mutating func makeRoom(forAppending need: Int) throws(Errno) -> Int {
        let tail = region.capacity - writeIndex
        if tail >= need && tail >= nominalCapacity / 8 { return 0 }
        let keep = buffered
        let size = max(nominalCapacity, keep + need)
        if region.capacity >= size && region.capacity <= 2 * size && noViewsLeft() {
            // Safety: no view references the region, so its consumed bytes can be overwritten.
            let start = alignedStart(keep: keep, need: need, capacity: region.capacity)
            let moved = keep > 0 && readIndex != start
            if moved {
                // copyMemory allows overlapping ranges (memmove).
                (region.base + start).copyMemory(from: region.base + readIndex, byteCount: keep)
            }
            readIndex = start
            writeIndex = start + keep
            return moved ? keep : 0
        }
        let fresh = try pool.residentRegion(atLeast: size, register: true)
        let start = alignedStart(keep: keep, need: need, capacity: fresh.capacity)
        if keep > 0 {
            (fresh.base + start).copyMemory(from: region.base + readIndex, byteCount: keep)
        }
        replace(with: fresh, readIndex: start, writeIndex: start + keep)
        return keep
    }

    /// O_DIRECT: with nothing buffered, moves the (empty) read position forward to the next
    /// offset whose address is `phase` mod `alignment` (the region's base is page-aligned), so
    /// that the next fill lands where the kernel can write without a bounce copy. Skips at most
    /// `alignment - 1` bytes of free space; no view can reference them.
    mutating func alignEmpty(phase: Int, alignment: Int) {
        guard buffered == 0 else { return }
        let skip = ((phase - writeIndex) % alignment + alignment) % alignment
        guard skip > 0, writeIndex + skip <= region.capacity else { return }
        readIndex = writeIndex + skip
        writeIndex = readIndex
    }

    /// Where the kept bytes go when staging makes room: at the same offset within a page as
    /// now, so that the stream keeps its alignment to staging's pages from refill to refill
    /// (for a file read from a page boundary, every read then lands at the page offset it
    /// comes from, and the kernel's copy runs at full speed: a frame stream of 64 B read into
    /// staging shifted by a few bytes against the page cache ran 25 % slower). At the front
    /// when that would leave too little room.
    private func alignedStart(keep: Int, need: Int, capacity: Int) -> Int {
        let start = readIndex & (Block.pageSize - 1)
        let free = capacity - start - keep
        return free >= need && free >= nominalCapacity / 8 ? start : 0
    }

    /// Puts `bytes` back in front of the buffered bytes (they were consumed by a read that
    /// then failed): in place when the room in front is free, else in a fresh heap region (off
    /// the pool, so that a refused mapping cannot lose them). Returns the bytes copied. Error
    /// path only.
    mutating func unconsume(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
        if prepend(bytes) { return bytes.count }
        let keep = buffered
        let fresh = try Region.standalone(capacity: max(nominalCapacity, keep + bytes.count))
        if let src = bytes.baseAddress, bytes.count > 0 { fresh.base.copyMemory(from: src, byteCount: bytes.count) }
        if keep > 0 {
            (fresh.base + bytes.count).copyMemory(from: region.base + readIndex, byteCount: keep)
        }
        replace(with: fresh, readIndex: 0, writeIndex: bytes.count + keep)
        return bytes.count + keep
    }

    /// Replaces the (empty) buffer with `region`, whose bytes `[start, end)` are unconsumed
    /// data: keeps the bytes of a large read that failed part-way, so none is lost, with no
    /// copy. `region` must not be referenced by any view.
    mutating func adopt(_ region: Region, bytes start: Int, _ end: Int) {
        precondition(buffered == 0 && start <= end && end <= region.capacity)
        replace(with: region, readIndex: start, writeIndex: end)
    }

    /// Writes `bytes` in front of the buffered ones when the region has room there that no
    /// view can reference (after `adopt` of a frame region, whose first page is left free for
    /// this, or where the bytes were just consumed). Returns false when there is no such room.
    mutating func prepend(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let n = bytes.count
        guard n > 0, let src = bytes.baseAddress else { return true }
        guard n <= readIndex else { return false }
        let start = readIndex - n
        for i in (2 * (start >> chunkShift))...(2 * ((readIndex - 1) >> chunkShift) + 1) where chunks[i] != nil {
            if !isKnownUniquelyReferenced(&chunks[i]!) { return false }
        }
        // Views never start or cross past readIndex, but an owner of an earlier chunk may run
        // into the range: the crossing owners before it must be free too.
        for i in stride(from: 1, to: 2 * (start >> chunkShift), by: 2) where chunks[i] != nil {
            if chunks[i]!.end > start && !isKnownUniquelyReferenced(&chunks[i]!) { return false }
        }
        (region.base + start).copyMemory(from: src, byteCount: n)
        readIndex = start
        return true
    }

    /// The region of a large read that failed part-way (`adopt`ed, its length prefix put back
    /// in front), when it is what staging holds now: exactly `skip` prefix bytes followed by
    /// the body's first bytes at offset `frontRoom`, in a region of at least `needed` bytes
    /// that no view references (any region laid out so will do: the body is where it belongs). Staging then starts afresh and the caller continues the read
    /// where it stopped, with nothing copied. Nil otherwise.
    mutating func resumeFrame(after skip: Int, frontRoom: Int, needed: Int) throws(Errno) -> Region? {
        guard readIndex + skip == frontRoom, region.capacity >= needed, noViewsLeft() else { return nil }
        let frame = region
        let fresh = try pool.residentRegion(atLeast: nominalCapacity, register: true)
        region = fresh
        readIndex = 0
        writeIndex = 0
        chunkShift = StagingBuffer.chunkShift(for: fresh.capacity)
        chunks = StagingBuffer.noChunks(fresh.capacity, chunkShift)
        return frame
    }

    private mutating func replace(with fresh: Region, readIndex r: Int, writeIndex w: Int) {
        retire()
        region = fresh
        readIndex = r
        writeIndex = w
        chunkShift = StagingBuffer.chunkShift(for: fresh.capacity)
        chunks = StagingBuffer.noChunks(fresh.capacity, chunkShift)
    }

    /// True when no view references the region: every chunk owner is held by this buffer
    /// alone (then the region's bytes may be written again).
    mutating func noViewsLeft() -> Bool {
        for i in chunks.indices where chunks[i] != nil {
            if !isKnownUniquelyReferenced(&chunks[i]!) { return false }
            chunks[i]!.end = 0
        }
        return true
    }

    /// Called before the region is let go: when views keep it, every page they cannot reference
    /// goes back to the system (after unregistering the block, as pinned pages would stay
    /// resident). Afterwards the buffer holds no chunk owner of the region.
    mutating func retire() {
        let count = chunks.count / 2
        var kept = [Bool](repeating: false, count: count)
        var any = false
        for i in chunks.indices where chunks[i] != nil {
            if isKnownUniquelyReferenced(&chunks[i]!) { continue }
            let first = i / 2
            let last = i % 2 == 0 ? first : min(count - 1, (chunks[i]!.end - 1) >> chunkShift)
            for k in first...last { kept[k] = true }
            any = true
        }
        for i in chunks.indices { chunks[i] = nil }
        guard any else { return }  // no view: the whole region goes back to the pool as it is
        var i = 0
        while i < count {
            if kept[i] {
                i += 1
                continue
            }
            var j = i
            while j < count && !kept[j] { j += 1 }
            region.decommit(i << chunkShift, min(j << chunkShift, region.capacity), pool: pool)
            i = j
        }
    }
}
