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
/// is retired to its views and the buffered bytes move to a fresh one.
struct StagingBuffer {
    private(set) var region: Region
    private(set) var readIndex = 0
    private(set) var writeIndex = 0
    /// The configured capacity; `region` may be larger for a while after an error stashed a
    /// partially read frame in it.
    let nominalCapacity: Int
    let pool: MemoryPool

    init(pool: MemoryPool, capacity: Int) {
        self.pool = pool
        self.nominalCapacity = Block.roundedCapacity(capacity)
        self.region = pool.region(atLeast: nominalCapacity)
    }

    var buffered: Int { writeIndex - readIndex }

    /// The buffered bytes. Valid until the next mutating call.
    var readable: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: region.base + readIndex, count: buffered)
    }

    /// The free tail, where the next read lands. Valid until the next mutating call.
    var writable: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: region.base + writeIndex, count: region.capacity - writeIndex)
    }

    /// A view of the next `count` buffered bytes, consuming them (no copy).
    mutating func consumeView(_ count: Int) -> ByteView {
        precondition(count <= buffered)
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base + readIndex, count: count), owner: region)
        readIndex += count
        return view
    }

    mutating func consume(_ count: Int) {
        precondition(count <= buffered)
        readIndex += count
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
    mutating func makeRoom(forAppending need: Int) -> Int {
        let tail = region.capacity - writeIndex
        if tail >= need && tail >= nominalCapacity / 8 { return 0 }
        let keep = buffered
        let size = max(nominalCapacity, keep + need)
        if isKnownUniquelyReferenced(&region) && region.capacity >= size && region.capacity <= 2 * size {
            // Safety: no view references the region, so its consumed bytes can be overwritten.
            let moved = keep > 0 && readIndex > 0
            if moved {
                // copyMemory allows overlapping ranges (memmove).
                region.base.copyMemory(from: region.base + readIndex, byteCount: keep)
            }
            readIndex = 0
            writeIndex = keep
            return moved ? keep : 0
        }
        let fresh = pool.region(atLeast: size)
        if keep > 0 {
            fresh.base.copyMemory(from: region.base + readIndex, byteCount: keep)
        }
        region = fresh  // the old region lives on in its views, then returns to the pool
        readIndex = 0
        writeIndex = keep
        return keep
    }

    /// Puts `bytes` back in front of the buffered bytes (they were consumed by a read that
    /// then failed), in a fresh region. Returns the bytes copied. Error path only.
    mutating func unconsume(_ bytes: [UInt8]) -> Int {
        let keep = buffered
        let fresh = pool.region(atLeast: max(nominalCapacity, keep + bytes.count))
        bytes.withUnsafeBytes { fresh.base.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        if keep > 0 {
            (fresh.base + bytes.count).copyMemory(from: region.base + readIndex, byteCount: keep)
        }
        region = fresh
        readIndex = 0
        writeIndex = bytes.count + keep
        return bytes.count + keep
    }

    /// Replaces the (empty) buffer with `region`, whose first `count` bytes are unconsumed
    /// data: used to keep the bytes of a read that failed part-way, so none is lost.
    mutating func adopt(_ region: Region, holding count: Int) {
        precondition(buffered == 0 && count <= region.capacity)
        self.region = region
        readIndex = 0
        writeIndex = count
    }
}
