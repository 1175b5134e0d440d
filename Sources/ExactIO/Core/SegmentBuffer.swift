import SystemPackage

// The loop reader's buffer: received segments in stream order (SegmentQueue, also the loop's
// queue of a connection's received bytes), as the core's CoreBuffer.

/// Received bytes in memory someone else chose: a receive buffer of the loop's pool (a
/// provided buffer the kernel picked), a region adopted after a failed large read, or a
/// queue's coalescing arena.
struct Segment: @unchecked Sendable {
    // @unchecked Sendable: `base` points into memory `owner` keeps alive; the loop hands a
    // segment to the reader once and never writes its bytes again.
    /// Keeps the memory alive; views of the segment share it.
    let owner: AnyObject & Sendable
    let base: UnsafeMutableRawPointer
    var start: Int
    var end: Int
    /// Bytes in front of `start` that no view can reference (the front room of an adopted
    /// frame region), where a length prefix may be written back.
    var freeFront: Int = 0

    var count: Int { end - start }

    /// True when `next` continues this segment in the same memory (the kernel filled one
    /// receive buffer a part at a time for this connection, or an arena took both).
    func isContinued(by next: Segment) -> Bool {
        owner === next.owner && base == next.base && end == next.start
    }
}

/// Segments in stream order, with the rules that keep a peer who sends a byte at a time from
/// making the loop hold more than a small constant per byte (each segment costs
/// `MemoryLayout<Segment>.stride` bytes of bookkeeping, and pins its receive buffer):
/// - a segment that continues the last one in the same memory extends it;
/// - once `coalesceAfter` segments are queued, a small one (at most `smallSegment` bytes) is
///   copied into the queue's arena, memory of its own written only past what it handed out,
///   and its receive buffer goes back at once (one copy of those bytes, counted);
/// - consumed slots are compacted away (amortized O(1) per segment).
/// Used twice: the loop's queue of a connection's received bytes, and the reader's buffer.
struct SegmentQueue {
    private(set) var segments: [Segment] = []
    /// Index of the first segment with unconsumed bytes.
    private(set) var head = 0
    /// Unconsumed bytes.
    private(set) var bytes = 0
    /// Where small segments are copied. Bytes below `arenaEnd` may be in segments and views:
    /// they are never written again; only the free tail past it is.
    private var arena: Region? = nil
    private var arenaEnd = 0

    static let coalesceAfter = 8
    static let smallSegment = 512
    static let arenaCapacity = 64 << 10

    /// Segments with unconsumed bytes.
    var count: Int { segments.count - head }
    var isEmpty: Bool { bytes == 0 }
    var live: ArraySlice<Segment> { segments[head...] }

    /// Memory the queue accounts for: its bytes and each segment's bookkeeping (what
    /// backpressure counts, rather than payload alone).
    var heldBytes: Int { bytes + count * MemoryLayout<Segment>.stride }

    /// Appends `segment`; returns the bytes copied (into the arena) to do so.
    @discardableResult
    mutating func append(_ segment: Segment) -> Int {
        guard segment.count > 0 else { return 0 }
        if bytes == 0 && !segments.isEmpty {
            // Only consumed or empty slots are left (an empty one may be an adopted region whose
            // bytes were all consumed): none may sit in front of new bytes.
            segments.removeAll(keepingCapacity: true)
            head = 0
        }
        if count > 0 && segments[segments.count - 1].isContinued(by: segment) {
            segments[segments.count - 1].end = segment.end
            bytes += segment.count
            return 0
        }
        if count >= Self.coalesceAfter && segment.count <= Self.smallSegment && copyIntoArena(segment) {
            return segment.count
        }
        segments.append(segment)
        bytes += segment.count
        return 0
    }

    /// Copies `segment`'s bytes to the arena's free tail (a fresh arena when it has no room)
    /// and queues them; false when no memory could be had (the caller keeps the segment).
    private mutating func copyIntoArena(_ segment: Segment) -> Bool {
        let n = segment.count
        if arena == nil || arena!.capacity - arenaEnd < n {
            // 4 KiB first, twice the last one after (up to 64 KiB): a queue that coalesces a few
            // small segments pays for a page, one that keeps trickling for larger arenas.
            let next = min(Self.arenaCapacity, 2 * (arena?.capacity ?? 2048))
            guard let fresh = try? Region.standalone(capacity: max(next, n)) else { return false }
            arena = fresh
            arenaEnd = 0
        }
        let region = arena!
        (region.base + arenaEnd).copyMemory(from: segment.base + segment.start, byteCount: n)
        let copy = Segment(owner: region, base: region.base, start: arenaEnd, end: arenaEnd + n)
        arenaEnd += n
        if count > 0 && segments[segments.count - 1].isContinued(by: copy) {
            segments[segments.count - 1].end = copy.end
        } else {
            segments.append(copy)
        }
        bytes += n
        return true
    }

    /// Moves the bytes that sit in the loop's shared receive buffers into memory of their own,
    /// so that a partial frame or an idle reader's queue does not keep receive buffers out of
    /// the pool: every unconsumed byte, copied once into one region of their exact size (one
    /// segment: the frame they start goes on from there). Returns the bytes copied, or nil
    /// when memory for the copy could not be had (nothing changes then).
    mutating func detachFromReceiveBuffers() -> Int? {
        guard live.contains(where: { $0.owner is ReceiveBuffer }) else { return 0 }
        let n = bytes
        guard let region = try? Region.standalone(capacity: n) else { return nil }
        var done = 0
        for s in live {
            (region.base + done).copyMemory(from: s.base + s.start, byteCount: s.count)
            done += s.count
        }
        reset(to: Segment(owner: region, base: region.base, start: 0, end: n))
        return n
    }

    /// The first segment with unconsumed bytes (`count > 0`).
    var first: Segment { segments[head] }

    /// Consumes `n` bytes from the front (`n <= bytes`).
    @inline(__always)
    mutating func consume(_ n: Int) {
        precondition(n <= bytes)
        if n < bytes && n < segments[head].count {
            // The common case: inside the first segment.
            bytes -= n
            segments[head].start &+= n
            segments[head].freeFront = 0
            return
        }
        consumeAcross(n)
    }

    private mutating func consumeAcross(_ n: Int) {
        var left = n
        bytes -= n
        while left > 0 {
            let k = min(left, segments[head].count)
            segments[head].start += k
            segments[head].freeFront = 0
            left -= k
            if segments[head].count == 0 { dropHead() }
        }
    }

    private mutating func dropHead() {
        // The slot lets go of its owner now (a receive buffer goes back to the pool).
        segments[head] = Segment(owner: EmptyOwner.shared, base: segments[head].base, start: 0, end: 0)
        head += 1
        if head == segments.count {
            segments.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 32 && head * 2 >= segments.count {
            segments.removeFirst(head)
            head = 0
        }
    }

    /// Takes the unconsumed segments out, leaving the queue empty (its arena stays, for the
    /// next small segments).
    mutating func takeAll() -> ArraySlice<Segment> {
        let out = segments[head...]
        segments.removeAll(keepingCapacity: true)
        head = 0
        bytes = 0
        return out
    }

    /// Replaces everything with `segment` alone (`adopt`, `detachFromReceiveBuffers`).
    mutating func reset(to segment: Segment) {
        segments.removeAll(keepingCapacity: true)
        head = 0
        segments.append(segment)
        bytes = segment.count
    }

    /// Puts `segment` in front of the unconsumed segments (`unconsume`).
    mutating func push(front segment: Segment) {
        let rest = segments[head...]
        segments = [segment] + rest
        head = 0
        bytes += segment.count
    }

    /// Grows the first segment by `n` bytes in front (room `prepend` has checked).
    mutating func extendFront(_ n: Int) {
        segments[head].start -= n
        segments[head].freeFront -= n
        bytes += n
    }

    /// Drops everything, the arena included.
    mutating func removeAll() {
        segments.removeAll()
        head = 0
        bytes = 0
        arena = nil
        arenaEnd = 0
    }
}

/// The buffered bytes of a loop reader: a queue of received segments, in stream order.
///
/// A small frame that lies inside one segment is a view of it (no copy); one that spans
/// segments is copied once into memory of its own (counted in `bytesCopied`). Large bodies
/// go straight into their own memory (the core's large reads), never through here.
struct SegmentBuffer: CoreBuffer {
    private(set) var queue = SegmentQueue()
    let nominalCapacity: Int

    init(nominalCapacity: Int) {
        self.nominalCapacity = nominalCapacity
    }

    var buffered: Int { queue.bytes }

    /// What keeps the first buffered bytes' memory alive (nil when nothing is buffered): held
    /// while those bytes are lent in place.
    var firstOwner: AnyObject? {
        guard queue.bytes > 0 else { return nil }
        let owner: AnyObject = queue.first.owner
        return owner
    }

    /// Appends what the loop received; returns the bytes copied to keep the queue short.
    mutating func appendAll(_ more: some Sequence<Segment>) -> Int {
        var copied = 0
        for s in more { copied += queue.append(s) }
        return copied
    }

    /// How many bytes lie in one run from `offset` (counted from the first buffered byte) to
    /// the end of the segment that holds it; 0 past the buffered bytes.
    func run(at offset: Int) -> Int {
        // Indices, not `for s in queue.live`: an unspecialized iterator (debug builds) boxes
        // each segment on the heap.
        var skip = offset
        var i = queue.head
        while i < queue.segments.count {
            let n = queue.segments[i].count
            if skip < n { return n - skip }
            skip -= n
            i += 1
        }
        return 0
    }

    var contiguousReadable: UnsafeRawBufferPointer {
        guard queue.bytes > 0 else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        let s = queue.first
        return UnsafeRawBufferPointer(start: s.base + s.start, count: s.count)
    }

    mutating func viewInPlace(_ count: Int) -> ByteView {
        let s = queue.first
        precondition(count > 0 && count <= s.count)
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: s.base + s.start, count: count), owner: s.owner)
        queue.consume(count)
        return view
    }

    /// The byte at offset `i`: a walk over the segments in front of it (callers look at most
    /// at a prefix's ten bytes).
    func byte(at i: Int) -> UInt8 {
        var i = i
        for s in queue.live {
            if i < s.count { return s.base.load(fromByteOffset: s.start + i, as: UInt8.self) }
            i -= s.count
        }
        preconditionFailure("byte(at:) past the buffered bytes")
    }

    mutating func consume(_ count: Int) {
        queue.consume(count)
    }

    mutating func view(_ count: Int) throws(Errno) -> (ByteView, copied: Int) {
        precondition(count > 0 && count <= queue.bytes)
        if queue.first.count >= count { return (viewInPlace(count), 0) }
        // Spans segments: one copy into memory of its own.
        let region = try Region.standalone(capacity: count)
        let n = copyOut(into: region.base, max: count)
        return (ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: n), owner: region), n)
    }

    mutating func copyOut(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        var done = 0
        let want = min(max, queue.bytes)
        while done < want {
            let s = queue.first
            let n = min(want - done, s.count)
            (dst + done).copyMemory(from: s.base + s.start, byteCount: n)
            done += n
            queue.consume(n)
        }
        return done
    }

    mutating func adopt(_ region: Region, bytes start: Int, _ end: Int) {
        precondition(queue.bytes == 0)
        queue.reset(to: Segment(owner: region, base: region.base, start: start, end: end, freeFront: start))
    }

    mutating func prepend(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let n = bytes.count
        guard n > 0, let src = bytes.baseAddress else { return true }
        guard queue.count > 0, queue.first.freeFront >= n else { return false }
        let s = queue.first
        (s.base + s.start - n).copyMemory(from: src, byteCount: n)
        queue.extendFront(n)
        return true
    }

    mutating func resumeFrame(after skip: Int, frontRoom: Int, needed: Int) throws(Errno) -> Region? {
        guard queue.count == 1, queue.first.start + skip == frontRoom, var region = queue.first.owner as? Region,
              region.capacity >= needed
        else { return nil }
        let (start, end, front) = (queue.first.start, queue.first.end, queue.first.freeFront)
        // Only `region` holds it once the queue lets go, unless a view does too.
        queue.removeAll()
        guard isKnownUniquelyReferenced(&region) else {
            queue.reset(to: Segment(owner: region, base: region.base, start: start, end: end, freeFront: front))
            return nil
        }
        return region
    }

    mutating func unconsume(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
        guard bytes.count > 0, let src = bytes.baseAddress else { return 0 }
        let region = try Region.standalone(capacity: bytes.count)
        region.base.copyMemory(from: src, byteCount: bytes.count)
        queue.push(front: Segment(owner: region, base: region.base, start: 0, end: bytes.count))
        return bytes.count
    }

    /// Moves the buffered bytes that sit in the loop's shared receive buffers into memory of
    /// their own, so that a partial frame waiting for its end does not keep receive buffers
    /// out of the pool while it is short of them. Returns the bytes copied.
    mutating func detachFromReceiveBuffers() throws(Errno) -> Int {
        guard let copied = queue.detachFromReceiveBuffers() else { throw .noMemory }
        return copied
    }

    mutating func retire() {
        queue.removeAll()
    }
}

/// The owner of consumed segment slots (holds nothing).
final class EmptyOwner: Sendable {
    static let shared = EmptyOwner()
}
