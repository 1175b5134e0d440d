import SystemPackage

// What the reader core needs of the memory its bytes are buffered in: a staging buffer the
// blocking reader reads into, or the event loop's received segments.

/// The buffered bytes of a reader, whatever memory they arrived in: one staging buffer that the
/// driver reads into (`StagingBuffer`, the blocking reader's), or segments of received memory
/// (`SegmentBuffer`, the event loop's). The core's logic sees only this.
protocol CoreBuffer {
    /// Bytes buffered and not yet consumed.
    var buffered: Int { get }
    /// The capacity reads are sized against (staging capacity, or a received segment's size).
    var nominalCapacity: Int { get }
    /// The first contiguous run of buffered bytes (all of them for staging; the first
    /// segment's for received memory). Valid until the next mutating call.
    var contiguousReadable: UnsafeRawBufferPointer { get }
    /// A view of the next `count` buffered bytes, consuming them, when they lie in
    /// `contiguousReadable` (`0 < count <= contiguousReadable.count`): no allocation, no copy,
    /// one retain of the memory's owner.
    mutating func viewInPlace(_ count: Int) -> ByteView
    /// The buffered byte at offset `i` (`i < buffered`).
    func byte(at i: Int) -> UInt8
    /// Consumes `count` buffered bytes.
    mutating func consume(_ count: Int)
    /// A view of the next `count` buffered bytes, consuming them: in place when they are
    /// contiguous (the fast path), else copied once into memory of their own. Returns the
    /// bytes copied. Throws `Errno.noMemory` (nothing consumed) when a copy has no memory.
    mutating func view(_ count: Int) throws(Errno) -> (ByteView, copied: Int)
    /// Copies up to `max` buffered bytes to `dst`, consuming them; returns the count.
    mutating func copyOut(into dst: UnsafeMutableRawPointer, max: Int) -> Int
    /// Takes over `region`'s bytes `[start, end)` as the buffered bytes (the buffer is empty):
    /// a large read that failed part-way keeps what arrived, with no copy.
    mutating func adopt(_ region: Region, bytes start: Int, _ end: Int)
    /// Writes `bytes` in front of the buffered bytes when there is unreferenced room there.
    mutating func prepend(_ bytes: UnsafeRawBufferPointer) -> Bool
    /// The region of an adopted, part-read frame when the buffer holds exactly its prefix
    /// (`skip` bytes) and its first bytes at `frontRoom`, in at least `needed` bytes of memory
    /// no view references: the buffer lets go of it, and the read continues in place.
    mutating func resumeFrame(after skip: Int, frontRoom: Int, needed: Int) throws(Errno) -> Region?
    /// Puts `bytes` back in front of the buffered ones (copied). Returns the bytes copied.
    mutating func unconsume(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int
    /// Lets go of memory before the reader goes: pages no view can reference are given back.
    mutating func retire()
}
