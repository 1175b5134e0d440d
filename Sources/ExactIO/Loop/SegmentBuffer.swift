import SystemPackage

/// Received bytes in memory someone else chose: a receive buffer of the loop's pool (a
/// provided buffer the kernel picked), or a region adopted after a failed large read.
struct Segment: @unchecked Sendable {
    // @unchecked Sendable: `base` points into memory `owner` keeps alive; the loop hands a
    // segment to the reader once and never touches its bytes again.
    /// Keeps the memory alive; views of the segment share it.
    let owner: AnyObject & Sendable
    let base: UnsafeMutableRawPointer
    var start: Int
    let end: Int
    /// Bytes in front of `start` that no view can reference (the front room of an adopted
    /// frame region), where a length prefix may be written back.
    var freeFront: Int = 0

    var count: Int { end - start }
}

/// The buffered bytes of a loop reader: a queue of received segments, in stream order.
///
/// A small frame that lies inside one segment is a view of it (no copy); one that spans
/// segments is copied once into memory of its own (counted in `bytesCopied`). Large bodies
/// go straight into their own memory (the core's direct reads), never through here.
struct SegmentBuffer: CoreBuffer {
    private(set) var segments: [Segment] = []
    /// Index of the first segment with unconsumed bytes.
    private var head = 0
    private(set) var buffered = 0
    let nominalCapacity: Int

    init(nominalCapacity: Int) {
        self.nominalCapacity = nominalCapacity
    }

    mutating func append(_ segment: Segment) {
        guard segment.count > 0 else { return }
        if buffered == 0 && !segments.isEmpty {
            // Only consumed or empty segments are left (an empty one may be an adopted region
            // whose bytes were all consumed): none may sit in front of new bytes, where copyOut
            // would never pass it.
            segments.removeAll(keepingCapacity: true)
            head = 0
        }
        segments.append(segment)
        buffered += segment.count
    }

    var contiguousReadable: UnsafeRawBufferPointer {
        guard buffered > 0 else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        let s = segments[head]
        return UnsafeRawBufferPointer(start: s.base + s.start, count: s.count)
    }

    mutating func viewInPlace(_ count: Int) -> ByteView {
        let s = segments[head]
        precondition(count > 0 && count <= s.count)
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: s.base + s.start, count: count), owner: s.owner)
        consume(count)
        return view
    }

    func byte(at i: Int) -> UInt8 {
        var i = i
        var k = head
        while i >= segments[k].count {
            i -= segments[k].count
            k += 1
        }
        return segments[k].base.load(fromByteOffset: segments[k].start + i, as: UInt8.self)
    }

    mutating func consume(_ count: Int) {
        precondition(count <= buffered)
        var left = count
        buffered -= count
        while left > 0 {
            let n = min(left, segments[head].count)
            segments[head].start += n
            segments[head].freeFront = 0
            left -= n
            if segments[head].count == 0 { dropHead() }
        }
    }

    private mutating func dropHead() {
        segments[head] = Segment(owner: EmptyOwner.shared, base: segments[head].base, start: 0, end: 0)
        head += 1
        if head == segments.count {
            segments.removeAll(keepingCapacity: true)
            head = 0
        }
    }

    mutating func view(_ count: Int) throws(Errno) -> (ByteView, copied: Int) {
        precondition(count > 0 && count <= buffered)
        let s = segments[head]
        if s.count >= count {
            let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: s.base + s.start, count: count), owner: s.owner)
            consume(count)
            return (view, 0)
        }
        // Spans segments: one copy into memory of its own.
        let region = try Region.standalone(capacity: count)
        let n = copyOut(into: region.base, max: count)
        return (ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: n), owner: region), n)
    }

    mutating func copyOut(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        var done = 0
        let want = min(max, buffered)
        while done < want {
            let s = segments[head]
            let n = min(want - done, s.count)
            (dst + done).copyMemory(from: s.base + s.start, byteCount: n)
            done += n
            consume(n)
        }
        return done
    }

    /// Takes every segment out (the loop hands them over in one piece).
    mutating func appendAll(_ more: [Segment]) {
        for s in more { append(s) }
    }

    mutating func adopt(_ region: Region, bytes start: Int, _ end: Int) {
        precondition(buffered == 0)
        segments.removeAll(keepingCapacity: true)
        head = 0
        segments.append(Segment(owner: region, base: region.base, start: start, end: end, freeFront: start))
        buffered = end - start
    }

    mutating func prepend(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let n = bytes.count
        guard n > 0, let src = bytes.baseAddress else { return true }
        guard head < segments.count, segments[head].freeFront >= n else { return false }
        segments[head].start -= n
        segments[head].freeFront -= n
        (segments[head].base + segments[head].start).copyMemory(from: src, byteCount: n)
        buffered += n
        return true
    }

    mutating func resumeFrame(after skip: Int, frontRoom: Int, needed: Int) throws(Errno) -> Region? {
        guard segments.count - head == 1, segments[head].start + skip == frontRoom,
              var region = segments[head].owner as? Region, region.capacity >= needed
        else { return nil }
        let (start, end, front) = (segments[head].start, segments[head].end, segments[head].freeFront)
        segments[head] = Segment(owner: EmptyOwner.shared, base: region.base, start: start, end: end)
        // Now only `region` holds it, unless a view does too.
        guard isKnownUniquelyReferenced(&region) else {
            segments[head] = Segment(owner: region, base: region.base, start: start, end: end, freeFront: front)
            return nil
        }
        segments.removeAll(keepingCapacity: true)
        head = 0
        buffered = 0
        return region
    }

    mutating func unconsume(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
        guard bytes.count > 0, let src = bytes.baseAddress else { return 0 }
        let region = try Region.standalone(capacity: bytes.count)
        region.base.copyMemory(from: src, byteCount: bytes.count)
        let rest = Array(segments[head...])
        segments = [Segment(owner: region, base: region.base, start: 0, end: bytes.count)] + rest
        head = 0
        buffered += bytes.count
        return bytes.count
    }

    /// Moves the buffered bytes that sit in the loop's shared receive buffers into memory of
    /// their own (one copy), so that a partial frame waiting for its end does not keep receive
    /// buffers out of the pool while it is short of them. Returns the bytes copied.
    mutating func detachFromReceiveBuffers() throws(Errno) -> Int {
        guard buffered > 0, segments[head...].contains(where: { $0.owner is ReceiveBuffer }) else { return 0 }
        let region = try Region.standalone(capacity: buffered)
        let n = copyOut(into: region.base, max: buffered)
        segments.removeAll(keepingCapacity: true)
        head = 0
        append(Segment(owner: region, base: region.base, start: 0, end: n))
        return n
    }

    mutating func retire() {
        segments.removeAll()
        head = 0
        buffered = 0
    }
}

/// The owner of consumed segment slots (holds nothing).
final class EmptyOwner: Sendable {
    static let shared = EmptyOwner()
}
