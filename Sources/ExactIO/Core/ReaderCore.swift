import SystemPackage

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

/// What the core needs next from its driver.
enum CoreRequest {
    /// At least this many bytes buffered in total. The driver reads into the buffer (blocking)
    /// or waits for received data (event loop), then calls `filled(_:)`; at end of stream the
    /// core sees fewer and answers accordingly.
    case buffered(Int)
    /// Bytes straight into their final memory: at least `minimum` into `dst`. The driver reads,
    /// then calls `directCompleted(_:)`.
    case direct(dst: UnsafeMutableRawBufferPointer, minimum: Int, slot: Int32)
}

/// One step of a read: its result, or what it needs first. Steps are re-entered after each
/// request is served until they are done (or throw).
enum CoreStep<T> {
    case done(T)
    case need(CoreRequest)
}

/// A large read in progress: where its bytes go and how many arrived.
struct DirectRead {
    enum Memory {
        /// A frame's own region; the bytes start at `ReaderCore.frontRoom`.
        case frame(Region)
        /// A `read(upTo:)` chunk: its own region, from offset 0, any count from 1.
        case chunk(Region)
        /// Caller memory (`readExactly(into:)`), registered in `slot` or not (-1).
        case caller(UnsafeMutableRawPointer, slot: Int32)
    }
    var memory: Memory
    /// Bytes wanted, and bytes there (staged ones copied first, then read).
    let count: Int
    var got: Int
    /// The length prefix consumed before the body (at most 10 bytes), put back on an error.
    var prefix: (UInt64, UInt64) = (0, 0)
    var prefixWidth = 0
    /// Where a frame's bytes start in its region: `ReaderCore.frontRoom`, plus what puts the
    /// kernel's first byte at an address aligned as O_DIRECT needs (`ReaderCore.alignment`).
    var front = ReaderCore<StagingBuffer>.frontRoom
}

/// The I/O-free core of a reader: framing, the read policy (read-ahead, the direct threshold,
/// committing memory ahead of data), end-of-stream and error state, and the one recovery path
/// that keeps every byte when a read fails part-way. It never waits: each operation is a
/// `step` that either finishes or says what it needs (`CoreRequest`); a driver — the blocking
/// `ExactReader`, or the event loop's `AsyncExactReader` — serves the request and steps again.
struct ReaderCore<Buffer: CoreBuffer> {
    var buffer: Buffer
    let pool: MemoryPool
    let maxFrameLength: Int
    /// `Options.lengthAdjustment`: added to every decoded length prefix.
    let lengthAdjustment: Int
    /// `Options.lengthIncludesPrefix`: the prefix's own width is subtracted from its length.
    let lengthIncludesPrefix: Bool
    /// Reads of at least this many bytes go straight to their final memory.
    let directThreshold: Int
    /// O_DIRECT (`DirectFileEngine`): the memory alignment the kernel needs, and the address
    /// phase (mod `alignment`) the next byte the engine delivers should land at for a read
    /// without a bounce copy. Set by the driver before each step; 1 and 0 otherwise.
    var alignment = 1
    var phase = 0
    /// With O_DIRECT: bytes of the frame's region past the end of the direct read's
    /// destination that the engine may also write (its last block, read whole with the body in
    /// one request); 0 for any other request. Set with each `.direct` request.
    var overreadRoom = 0
    var statistics = ExactReader.Statistics()
    /// The stream returned end-of-file (sticky: later reads do not retry).
    var sawEOF = false
    /// An error met while looking ahead (`isAtEOF`), for the next request to throw.
    var pendingError: Errno? = nil
    /// Set when the kernel may still write into memory the reader used (an io_uring request
    /// that could not be cancelled): every later call throws it.
    var brokenError: Errno? = nil
    /// How far a staging fill reads beyond what it needs: the whole free tail while frames are
    /// small, one page after a frame larger than staging.
    var readAhead: Int
    /// The large read in progress, if any.
    private(set) var direct: DirectRead? = nil
    /// The stream is inside a refused over-long varint: the next varint frame read skips to its
    /// last byte first; any other read ends the skip.
    var skippingVarint = false

    init(
        buffer: Buffer, pool: MemoryPool, maxFrameLength: Int, directThreshold: Int,
        lengthAdjustment: Int = 0, lengthIncludesPrefix: Bool = false
    ) {
        self.buffer = buffer
        self.pool = pool
        self.maxFrameLength = maxFrameLength
        self.lengthAdjustment = lengthAdjustment
        self.lengthIncludesPrefix = lengthIncludesPrefix
        self.directThreshold = directThreshold
        self.readAhead = buffer.nominalCapacity
    }

    /// The page left free in front of a large read's bytes: on an `Errno`, the frame's length
    /// prefix is written back there, so the bytes that arrived become the buffered start of
    /// the stream without being copied.
    static var frontRoom: Int { Block.pageSize }

    // MARK: - Serving requests

    /// Records what a fill did (counters, end of stream) and throws its error. The bytes it
    /// read are already in the buffer.
    mutating func filled(_ r: EngineResult, wanted: Int) throws(Errno) {
        count(r)
        if let e = r.error { throw e }
        if r.count < wanted { sawEOF = true }
    }

    /// Records what a direct read of at least `minimum` bytes did; on an error, the one
    /// recovery path keeps every byte that arrived (`abandon`) and the error is thrown.
    mutating func directCompleted(_ r: EngineResult, minimum: Int) throws(Errno) {
        count(r)
        guard var d = direct else { return }
        d.got += r.count
        if r.destinationPoisoned {
            switch d.memory {
            case .frame(let region), .chunk(let region): region.quarantine()
            case .caller: break
            }
        }
        direct = d
        if let e = r.error { try abandon(e) }
        if r.count < minimum { sawEOF = true }
    }

    /// A direct read stopped before its end for `error` (a cancelled task, a deadline): the
    /// `count` bytes it read are kept by the recovery path, and `error` is thrown.
    mutating func directInterrupted<E: Error>(count: Int, _ error: E) throws(E) {
        if var d = direct {
            d.got += count
            direct = d
        }
        try abandon(error)
    }

    mutating func count(_ r: EngineResult) {
        statistics.reads += r.reads
        statistics.fixedReads += r.fixedReads
        statistics.polls += r.polls
        if r.destinationPoisoned { brokenError = r.error ?? .notRecoverable }
    }

    /// The one recovery path, for any failure of an operation in progress (an `Errno`, a
    /// timeout, a cancelled task): nothing is lost. A large read's bytes become the buffered
    /// start of the stream, with its length prefix written back in front of them and no copy
    /// (frames), or copied back (caller memory). Then `error` is thrown.
    mutating func abandon<E: Error>(_ error: E) throws(E) {
        guard let d = direct else { throw error }
        direct = nil
        if brokenError != nil { throw error }  // that memory is quarantined: nothing to keep
        switch d.memory {
        case .frame(let region):
            // Nothing arrived and no prefix to put back (`readExactly` of a large count): there is
            // nothing to keep (an empty adopted segment would sit in front of later bytes).
            if d.got == 0 && d.prefixWidth == 0 { throw error }
            buffer.adopt(region, bytes: d.front, d.front + d.got)
            var prefix = d.prefix
            let back = withUnsafeBytes(of: &prefix) { buffer.prepend(UnsafeRawBufferPointer(rebasing: $0[0..<d.prefixWidth])) }
            precondition(back, "the front room of a frame region is never viewed")
        case .chunk(let region):
            if d.got > 0 { buffer.adopt(region, bytes: 0, d.got) }
        case .caller(let base, _):
            if d.got > 0 {
                // The caller's memory is the caller's: its bytes are copied back.
                if let copied = try? buffer.unconsume(UnsafeRawBufferPointer(start: base, count: d.got)) {
                    statistics.bytesCopied += copied
                }
            }
        }
        throw error
    }

    // MARK: - Operations

    /// `readExactly(count)`.
    mutating func exactly(_ count: Int) throws -> CoreStep<ByteView> {
        skippingVarint = false
        return try body(count, after: 0)
    }

    /// `readFrame(prefix:)`: the prefix, then the body; consumes nothing until the body is
    /// there (or the stream ends).
    mutating func frame(_ prefix: LengthPrefix) throws -> CoreStep<ByteView?> {
        if prefix != .varint { skippingVarint = false }
        if direct != nil {
            switch try directStep() {
            case .done(let v): return .done(v)
            case .need(let r): return .need(r)
            }
        }
        let length: UInt64
        let width: Int
        switch try decode(prefix) {
        case .need(let n): return .need(.buffered(n))
        case .endOfStream: return .done(nil)
        case .length(let l, let w): (length, width) = (l, w)
        }
        let count: Int
        do {
            count = try bodyLength(length, width: width)
        } catch {
            buffer.consume(width)
            throw error
        }
        switch try body(count, after: width) {
        case .done(let v): return .done(v)
        case .need(let r): return .need(r)
        }
    }

    /// `read(upTo:)`: what is buffered, or what one read brings (straight into memory of its
    /// own for large counts, up to 4 MiB).
    mutating func upTo(_ maxCount: Int) throws -> CoreStep<ByteView> {
        skippingVarint = false
        if let d = direct {
            if d.got == 0 && buffer.buffered > 0 {
                direct = nil  // bytes arrived in the buffer meanwhile: they are the answer
                return .done(try deliver(min(maxCount, buffer.buffered)))
            }
            guard d.got == 0 && !sawEOF else {
                direct = nil
                guard case .chunk(let region) = d.memory, d.got > 0 else { return .done(ByteView()) }
                statistics.directReads += 1
                statistics.bytesDelivered += d.got
                releaseTail(of: region, after: d.got)
                return .done(ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: d.got), owner: region))
            }
            guard case .chunk(let region) = d.memory else { preconditionFailure("read(upTo:) resumed another read") }
            return .need(.direct(dst: UnsafeMutableRawBufferPointer(start: region.base, count: d.count), minimum: 1, slot: region.slot))
        }
        if buffer.buffered > 0 { return .done(try deliver(min(maxCount, buffer.buffered))) }
        if sawEOF { return .done(ByteView()) }
        if maxCount >= directThreshold {
            // A fresh block has nothing resident: the kernel commits the pages it writes, and
            // nothing more.
            let size = min(maxCount, max(4 << 20, buffer.nominalCapacity))
            let region = Region(block: try pool.take(atLeast: size), pool: pool)
            direct = DirectRead(memory: .chunk(region), count: size, got: 0)
            return .need(.direct(dst: UnsafeMutableRawBufferPointer(start: region.base, count: size), minimum: 1, slot: region.slot))
        }
        return .need(.buffered(1))
    }

    /// `skip(count)`: consumes as it goes (`statistics.bytesSkipped` says how far it got).
    mutating func skip(_ left: inout Int) throws -> CoreStep<Void> {
        skippingVarint = false
        readAhead = buffer.nominalCapacity  // skip reads as much as staging holds per read
        while left > 0 {
            if buffer.buffered == 0 {
                if sawEOF { throw ExactReadError.incomplete(partial: ByteView(), expected: left) }
                return .need(.buffered(1))
            }
            let n = min(left, buffer.buffered)
            buffer.consume(n)
            statistics.bytesSkipped += n
            left -= n
        }
        return .done(())
    }

    /// `readExactly(into:)`: staged bytes first, then the kernel writes the rest straight into
    /// the caller's memory.
    mutating func into(_ dst: UnsafeMutableRawBufferPointer, slot: Int32) throws -> CoreStep<Void> {
        skippingVarint = false
        let count = dst.count
        if var d = direct {
            if buffer.buffered > 0 && d.got < d.count {
                d.got += copyOut(into: dst.baseAddress! + d.got, max: d.count - d.got)
                direct = d
            }
            if d.got < d.count && !sawEOF {
                return .need(.direct(dst: UnsafeMutableRawBufferPointer(rebasing: dst[d.got...]), minimum: d.count - d.got, slot: slot))
            }
            direct = nil
            statistics.bytesDelivered += d.got
            if d.got < count { throw incomplete(dst, d.got) }
            return .done(())
        }
        let base = dst.baseAddress!
        if count - buffer.buffered < directThreshold {
            // Small: staged first (nothing is consumed if the fill fails), then one copy out.
            if buffer.buffered < count && !sawEOF {
                readAhead = buffer.nominalCapacity
                return .need(.buffered(count))
            }
            let done = copyOut(into: base, max: count)
            statistics.bytesDelivered += done
            if done < count { throw incomplete(dst, done) }
            return .done(())
        }
        let done = copyOut(into: base, max: count)
        if sawEOF {
            statistics.bytesDelivered += done
            throw incomplete(dst, done)
        }
        statistics.directReads += 1
        direct = DirectRead(memory: .caller(base, slot: slot), count: count, got: done)
        return .need(.direct(dst: UnsafeMutableRawBufferPointer(rebasing: dst[done...]), minimum: count - done, slot: slot))
    }

    // MARK: - Bodies

    /// `count` bytes that follow `skip` buffered bytes (a length prefix); both are consumed only
    /// when the body is there or the stream ended.
    mutating func body(_ count: Int, after skip: Int) throws -> CoreStep<ByteView> {
        if direct != nil { return try directStep() }
        if skip + count <= buffer.buffered {
            // The fast path: a view into the buffer, no allocation, no copy.
            buffer.consume(skip)
            return .done(try deliver(count))
        }
        if count < directThreshold {
            if !sawEOF {
                readAhead = buffer.nominalCapacity  // small reads: read ahead as far as staging goes
                return .need(.buffered(skip + count))
            }
            buffer.consume(skip)
            throw ExactReadError.incomplete(partial: try deliver(buffer.buffered), expected: count)
        }
        return try startDirect(count, after: skip)
    }

    /// A large read: the buffered prefix is copied into memory of the frame's own, then the
    /// kernel writes the rest straight there. Memory is committed a window ahead of the bytes
    /// (as much again as has arrived, 64 KiB to 16 MiB), so a length alone costs 64 KiB.
    private mutating func startDirect(_ count: Int, after skip: Int) throws -> CoreStep<ByteView> {
        let staged = buffer.buffered - skip
        if sawEOF {
            buffer.consume(skip)
            throw ExactReadError.incomplete(partial: try deliver(staged), expected: count)
        }
        // Frames larger than staging: read ahead only a page for the next prefix, so that little
        // of the next body is staged (and copied) before its own direct read.
        readAhead = count >= buffer.nominalCapacity ? Block.pageSize : buffer.nominalCapacity
        var front = Self.frontRoom
        if alignment > 1 {
            // O_DIRECT: the staged bytes are copied in front, so that the kernel's first byte
            // lands at an address with the phase its file offset needs.
            front += ((phase - staged) % alignment + alignment) % alignment
        }
        let (needed, overflow) = count.addingReportingOverflow(front)
        if overflow { throw Errno.noMemory }
        var prefix: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &prefix) { p in
            for i in 0..<skip { p[i] = buffer.byte(at: i) }
        }
        var d: DirectRead
        if front == Self.frontRoom, let resumed = try buffer.resumeFrame(after: skip, frontRoom: front, needed: needed) {
            // A retry of a frame whose read failed: its bytes are already where they belong.
            d = DirectRead(memory: .frame(resumed), count: count, got: staged)
        } else {
            var block = try pool.take(atLeast: needed)  // throws before anything is consumed
            if alignment > 1 && block.slot == nil {
                // O_DIRECT: the device writes with DMA into pinned pages; registered once, they
                // are not pinned per request (READ_FIXED). A file's frame lengths are the file's:
                // committing the frame's memory now costs nothing the read would not.
                block.commit(upTo: block.capacity)
                pool.register(&block)
            } else if block.slot == nil && block.resident >= needed
                && block.capacity - needed <= max(needed / 8, Block.hugePageSize) {
                // A pooled block whose pages an earlier frame made resident: register it, so that
                // this frame and the next ones are READ_FIXED.
                block.commit(upTo: block.capacity)
                pool.register(&block)
            }
            block.commit(upTo: front + staged)
            let region = Region(block: block, pool: pool)
            buffer.consume(skip)
            d = DirectRead(memory: .frame(region), count: count, got: copyOut(into: region.base + front, max: min(staged, count)))
        }
        d.prefix = prefix
        d.prefixWidth = skip
        d.front = front
        direct = d
        if d.got < count { statistics.directReads += 1 }
        return try directStep()
    }

    /// The next request of the large read in progress, or its result.
    private mutating func directStep() throws -> CoreStep<ByteView> {
        guard var d = direct, case .frame(let region) = d.memory else { preconditionFailure("no frame read in progress") }
        let front = d.front
        if buffer.buffered > 0 && d.got < d.count {
            // Bytes that arrived in the buffer meanwhile (an event loop's receive) come first.
            region.commit(upTo: front + min(d.count, d.got + buffer.buffered))
            d.got += copyOut(into: region.base + front + d.got, max: d.count - d.got)
            direct = d
        }
        if d.got < d.count && !sawEOF {
            var target = d.count
            if alignment > 1 {
                // O_DIRECT: the region is resident (see `startDirect`); its bytes past the frame
                // are never viewed, so the frame's last block can be read whole into them.
                overreadRoom = region.capacity - (front + d.count)
            }
            if region.slot < 0 && region.resident < front + d.count {
                let window = min(max(d.got, 64 << 10), 16 << 20)
                region.commit(upTo: front + min(d.count, d.got + window))
                target = min(d.count, region.resident - front)
            }
            return .need(.direct(
                dst: UnsafeMutableRawBufferPointer(start: region.base + front + d.got, count: d.count - d.got),
                minimum: target - d.got, slot: region.slot))
        }
        direct = nil
        releaseTail(of: region, after: front + d.got)
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base + front, count: d.got), owner: region)
        statistics.bytesDelivered += d.got
        if d.got < d.count {
            throw ExactReadError.incomplete(partial: d.got == 0 ? ByteView() : view, expected: d.count)
        }
        return .done(view)
    }

    // MARK: - The fast path

    /// The length at the start of `bytes` and the prefix's width, when the whole prefix is
    /// there and is one the slow path would accept as a prefix (an over-long varint is left to
    /// the slow path, which refuses it). No allocation: decoded in place.
    @inline(__always)
    static func peekLength(_ prefix: LengthPrefix, _ bytes: UnsafeRawBufferPointer) -> (length: UInt64, width: Int)? {
        let n = bytes.count
        switch prefix {
        case .uint32(let e):
            guard n >= 4 else { return nil }
            let raw = bytes.loadUnaligned(as: UInt32.self)
            return (UInt64(e == .bigEndian ? UInt32(bigEndian: raw) : UInt32(littleEndian: raw)), 4)
        case .uint16(let e):
            guard n >= 2 else { return nil }
            let raw = bytes.loadUnaligned(as: UInt16.self)
            return (UInt64(e == .bigEndian ? UInt16(bigEndian: raw) : UInt16(littleEndian: raw)), 2)
        case .uint8:
            guard n >= 1 else { return nil }
            return (UInt64(bytes[0]), 1)
        case .uint64(let e):
            guard n >= 8 else { return nil }
            let raw = bytes.loadUnaligned(as: UInt64.self)
            return (e == .bigEndian ? UInt64(bigEndian: raw) : UInt64(littleEndian: raw), 8)
        case .varint:
            var value: UInt64 = 0
            var i = 0
            while i < n && i < 10 {
                let byte = bytes[i]
                if i == 9 && byte > 1 { return nil }
                value |= UInt64(byte & 0x7f) << UInt64(7 * i)
                i += 1
                if byte & 0x80 == 0 { return (value, i) }
            }
            return nil
        }
    }

    /// The buffered run, the prefix width and the body length of the next frame when all of it
    /// is in that run and the fast path may take it; nil when the slow path must decide.
    @inline(__always)
    func stagedFrameBounds<D: PrefixDecoder>(_ decoder: D) -> (bytes: UnsafeRawBufferPointer, width: Int, count: Int)? {
        guard direct == nil, !skippingVarint else { return nil }
        let bytes = buffer.contiguousReadable
        guard let (length, width) = decoder.peekLength(bytes), length <= UInt64(maxFrameLength) else { return nil }
        // No overflow trap: a wrapped (negative) count goes to the slow path, which computes it
        // exactly and refuses it.
        let count = Int(length) &+ lengthAdjustment &- (lengthIncludesPrefix ? width : 0)
        guard count >= 0, count <= maxFrameLength, count <= bytes.count &- width else { return nil }
        return (bytes, width, count)
    }

    /// The body length a decoded prefix announces, after `lengthAdjustment` and
    /// `lengthIncludesPrefix`; throws `frameTooLarge` past `maxFrameLength` and
    /// `invalidLength` below zero (the caller consumes the prefix).
    func bodyLength(_ length: UInt64, width: Int) throws(ExactReadError) -> Int {
        // length + plus - minus, in UInt64 without a trap: plus <= Int.max, minus <= 2^63 + 10.
        let plus = UInt64(max(lengthAdjustment, 0))
        let minus = UInt64(lengthAdjustment < 0 ? lengthAdjustment.magnitude : 0) + UInt64(lengthIncludesPrefix ? width : 0)
        let (sum, overflow) = length.addingReportingOverflow(plus)
        if !overflow && sum < minus {
            let short = minus - sum
            throw .invalidLength(length: length, bodyLength: short > UInt64(Int.max) ? .min : -Int(short))
        }
        let body = overflow ? UInt64.max : sum - minus
        guard body <= UInt64(maxFrameLength) else {
            throw .frameTooLarge(length: body, limit: maxFrameLength)
        }
        return Int(body)
    }

    /// The next frame's body when the whole frame is buffered in one contiguous run, consumed
    /// with its prefix: the fast path of `readFrame` and the borrowing calls (no allocation,
    /// no syscall, no copy). Nil when the slow path must decide: the frame is not all there,
    /// its length is over the limit, or a large read or a varint skip is in progress.
    /// The bytes stay valid until the buffer next makes room (they are consumed).
    @inline(__always)
    mutating func takeStagedFrame(_ prefix: LengthPrefix) -> UnsafeRawBufferPointer? {
        takeStagedFrame(AnyPrefixDecoder(prefix: prefix))
    }

    /// `takeStagedFrame(_:)` with the decoding chosen at compile time (a specialized loop per
    /// prefix kind: no switch per frame).
    @inline(__always)
    mutating func takeStagedFrame<D: PrefixDecoder>(_ decoder: D) -> UnsafeRawBufferPointer? {
        guard let (bytes, width, count) = stagedFrameBounds(decoder) else { return nil }
        // No overflow below: count + width <= bytes.count.
        buffer.consume(width &+ count)
        statistics.bytesDelivered &+= count
        statistics.stagedViews &+= 1
        return UnsafeRawBufferPointer(start: bytes.baseAddress.unsafelyUnwrapped + width, count: count)
    }

    /// `takeStagedFrame`, as a view (one retain of the memory's owner, no allocation).
    @inline(__always)
    mutating func stagedFrame(_ prefix: LengthPrefix) -> ByteView? {
        stagedFrame(AnyPrefixDecoder(prefix: prefix))
    }

    @inline(__always)
    mutating func stagedFrame<D: PrefixDecoder>(_ decoder: D) -> ByteView? {
        guard let (_, width, count) = stagedFrameBounds(decoder) else { return nil }
        buffer.consume(width)
        statistics.bytesDelivered &+= count
        if count == 0 { return ByteView() }
        statistics.stagedViews &+= 1
        return buffer.viewInPlace(count)
    }

    /// The next `count` buffered bytes when they are contiguous, consumed (for `withExactly`);
    /// nil otherwise.
    @inline(__always)
    mutating func takeStaged(_ count: Int) -> UnsafeRawBufferPointer? {
        guard direct == nil else { return nil }
        skippingVarint = false
        let bytes = buffer.contiguousReadable
        guard count <= bytes.count else { return nil }
        buffer.consume(count)
        statistics.bytesDelivered += count
        statistics.stagedViews += 1
        return UnsafeRawBufferPointer(start: bytes.baseAddress, count: count)
    }

    // MARK: - Prefixes

    enum Decoded {
        case need(Int)
        case endOfStream
        case length(UInt64, Int)
    }

    /// Decodes a length prefix without consuming it. An over-long varint is consumed whole and
    /// refused.
    mutating func decode(_ prefix: LengthPrefix) throws -> Decoded {
        guard let width = prefix.width else { return try decodeVarint() }
        guard buffer.buffered >= width else {
            if !sawEOF { return .need(width) }
            if buffer.buffered == 0 { return .endOfStream }
            throw ExactReadError.incomplete(partial: try deliver(buffer.buffered), expected: width)
        }
        var value: UInt64 = 0
        switch prefix.endianness {
        case .bigEndian:
            for i in 0..<width { value = value << 8 | UInt64(buffer.byte(at: i)) }
        case .littleEndian:
            for i in (0..<width).reversed() { value = value << 8 | UInt64(buffer.byte(at: i)) }
        }
        return .length(value, width)
    }

    /// Unsigned LEB128, at most 10 bytes for 64 bits. A longer one (or a tenth byte with bits
    /// past 64) is refused with `frameTooLarge(length: UInt64.max, …)` once its last byte (the
    /// first without the continuation bit) or the end of the stream is reached. Its bytes are
    /// consumed as they are scanned, each once (counted in `statistics.bytesSkipped`), so a
    /// peer that trickles an endless prefix costs constant memory and linear time. An `Errno`
    /// while looking for its end leaves the skip where it stands: the next varint frame read
    /// resumes it (any other read starts at the current position and ends the skip).
    private mutating func decodeVarint() throws -> Decoded {
        if skippingVarint { return try skipOverlongVarint() }
        var value: UInt64 = 0
        var i = 0
        while true {
            guard i < buffer.buffered else {
                if !sawEOF { return .need(i + 1) }
                if buffer.buffered == 0 { return .endOfStream }
                throw ExactReadError.incomplete(partial: try deliver(buffer.buffered), expected: i + 1)
            }
            let byte = buffer.byte(at: i)
            if i == 9 && byte > 1 {
                // Past 64 bits: refused. The ten bytes scanned are the prefix's.
                buffer.consume(10)
                statistics.bytesSkipped += 10
                if byte & 0x80 == 0 { throw ExactReadError.frameTooLarge(length: .max, limit: maxFrameLength) }
                skippingVarint = true
                return try skipOverlongVarint()
            }
            value |= UInt64(byte & 0x7f) << UInt64(7 * i)
            i += 1
            if byte & 0x80 == 0 { return .length(value, i) }
        }
    }

    /// Consumes the rest of a refused varint: continuation bytes as they come, then its last
    /// byte (or the stream's end), and throws `frameTooLarge`.
    private mutating func skipOverlongVarint() throws -> Decoded {
        while true {
            let run = buffer.contiguousReadable
            guard run.count > 0 else {
                if !sawEOF { return .need(1) }
                break  // the stream ended inside the prefix
            }
            if let last = run.firstIndex(where: { $0 & 0x80 == 0 }) {
                buffer.consume(last + 1)
                statistics.bytesSkipped += last + 1
                break
            }
            buffer.consume(run.count)
            statistics.bytesSkipped += run.count
        }
        skippingVarint = false
        throw ExactReadError.frameTooLarge(length: .max, limit: maxFrameLength)
    }

    // MARK: - Helpers

    /// A view of `count` buffered bytes (the fast path: no allocation, no copy).
    mutating func deliver(_ count: Int) throws(Errno) -> ByteView {
        skippingVarint = false
        if count == 0 { return ByteView() }
        if count <= buffer.contiguousReadable.count {
            statistics.bytesDelivered += count
            statistics.stagedViews += 1
            return buffer.viewInPlace(count)
        }
        let (view, copied) = try buffer.view(count)
        statistics.bytesDelivered += count
        statistics.bytesCopied += copied
        if copied == 0 { statistics.stagedViews += 1 }
        return view
    }

    /// Copies up to `max` buffered bytes to `dst`, consuming them; returns the count.
    mutating func copyOut(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        let n = buffer.copyOut(into: dst, max: max)
        statistics.bytesCopied += n
        return n
    }

    /// `incomplete` for caller memory: `partial` is a copy of the `done` bytes at its start
    /// (empty if even that copy cannot be allocated; the bytes are in the caller's memory).
    func incomplete(_ dst: UnsafeMutableRawBufferPointer, _ done: Int) -> ExactReadError {
        let partial = (try? ByteView(copying: UnsafeRawBufferPointer(rebasing: dst[0..<done]))) ?? ByteView()
        return .incomplete(partial: partial, expected: dst.count)
    }

    /// Gives back the pages of `region` past `end` that no view can reference, when they are
    /// worth a syscall (at least 64 KiB and an eighth of what is used).
    func releaseTail(of region: Region, after end: Int) {
        let tail = region.capacity - Block.roundUpToPage(end)
        guard tail >= max(64 << 10, end / 8), region.resident > end else { return }
        region.decommit(end, region.capacity, pool: pool)
    }
}

/// Decodes a length prefix in place (see `ReaderCore.peekLength`); the concrete types let the
/// frame loop be specialized for the common prefixes.
protocol PrefixDecoder {
    func peekLength(_ bytes: UnsafeRawBufferPointer) -> (length: UInt64, width: Int)?
}

struct AnyPrefixDecoder: PrefixDecoder {
    let prefix: LengthPrefix
    @inline(__always)
    func peekLength(_ bytes: UnsafeRawBufferPointer) -> (length: UInt64, width: Int)? {
        ReaderCore<StagingBuffer>.peekLength(prefix, bytes)
    }
}

/// `.uint32(.bigEndian)`, the default.
struct UInt32BigEndianDecoder: PrefixDecoder {
    @inline(__always)
    func peekLength(_ bytes: UnsafeRawBufferPointer) -> (length: UInt64, width: Int)? {
        guard bytes.count >= 4 else { return nil }
        return (UInt64(UInt32(bigEndian: bytes.loadUnaligned(as: UInt32.self))), 4)
    }
}

struct UInt32LittleEndianDecoder: PrefixDecoder {
    @inline(__always)
    func peekLength(_ bytes: UnsafeRawBufferPointer) -> (length: UInt64, width: Int)? {
        guard bytes.count >= 4 else { return nil }
        return (UInt64(UInt32(littleEndian: bytes.loadUnaligned(as: UInt32.self))), 4)
    }
}

struct VarintDecoder: PrefixDecoder {
    @inline(__always)
    func peekLength(_ bytes: UnsafeRawBufferPointer) -> (length: UInt64, width: Int)? {
        ReaderCore<StagingBuffer>.peekLength(.varint, bytes)
    }
}
