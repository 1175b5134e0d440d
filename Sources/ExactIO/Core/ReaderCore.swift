import SystemPackage

// The I/O-free core of a reader: what a read needs next, framing, the one recovery path,
// and the staged fast path. Drivers (the blocking `ExactReader`, the loop's `AsyncExactReader`)
// serve its requests.

/// What the core needs next from its driver.
enum CoreRequest {
    /// At least this many bytes buffered in total. The driver reads into the buffer (blocking)
    /// or waits for received data (event loop), then calls `filled(_:)`; at end of stream the
    /// core sees fewer and answers accordingly.
    case buffered(Int)
    /// Bytes straight into their final memory: at least `minimum` into `dst`. The driver reads,
    /// then calls `largeReadCompleted(_:)`.
    case largeRead(dst: UnsafeMutableRawBufferPointer, minimum: Int, slot: Int32)
}

/// One step of a read: its result, or what it needs first. Steps are re-entered after each
/// request is served until they are done (or throw).
enum CoreStep<T> {
    case done(T)
    case need(CoreRequest)
}

/// The I/O-free core of a reader: framing, the read policy (read-ahead, the large-read threshold,
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
    let largeReadThreshold: Int
    /// O_DIRECT (`ODirectEngine`): the memory alignment the kernel needs, and the address
    /// phase (mod `alignment`) the next byte the engine delivers should land at for a read
    /// without a bounce copy. Set by the driver before each step; 1 and 0 otherwise.
    var alignment = 1
    var phase = 0
    /// With O_DIRECT: bytes of the frame's region past the end of the large read's
    /// destination that the engine may also write (its last block, read whole with the body in
    /// one request); 0 for any other request. Set with each `.largeRead` request.
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
    var largeRead: LargeRead? = nil
    /// The stream is inside a refused over-long varint: the next varint frame read skips to its
    /// last byte first; any other read ends the skip.
    var skippingVarint = false

    init(
        buffer: Buffer, pool: MemoryPool, maxFrameLength: Int, largeReadThreshold: Int,
        lengthAdjustment: Int = 0, lengthIncludesPrefix: Bool = false
    ) {
        self.buffer = buffer
        self.pool = pool
        self.maxFrameLength = maxFrameLength
        self.lengthAdjustment = lengthAdjustment
        self.lengthIncludesPrefix = lengthIncludesPrefix
        self.largeReadThreshold = largeReadThreshold
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

    /// Records what a large read of at least `minimum` bytes did; on an error, the one
    /// recovery path keeps every byte that arrived (`abandon`) and the error is thrown.
    mutating func largeReadCompleted(_ r: EngineResult, minimum: Int) throws(Errno) {
        count(r)
        guard var d = largeRead else { return }
        d.got += r.count
        if r.destinationPoisoned {
            switch d.memory {
            case .frame(let region), .chunk(let region): region.quarantine()
            case .caller: break
            }
        }
        largeRead = d
        if let e = r.error { try abandon(e) }
        if r.count < minimum { sawEOF = true }
    }

    /// A large read stopped before its end for `error` (a cancelled task, a deadline): the
    /// `count` bytes it read are kept by the recovery path, and `error` is thrown.
    mutating func largeReadInterrupted<E: Error>(count: Int, _ error: E) throws(E) {
        if var d = largeRead {
            d.got += count
            largeRead = d
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
        guard let d = largeRead else { throw error }
        largeRead = nil
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
        if largeRead != nil {
            switch try largeReadStep() {
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
        if let d = largeRead {
            if d.got == 0 && buffer.buffered > 0 {
                largeRead = nil  // bytes arrived in the buffer meanwhile: they are the answer
                return .done(try deliver(min(maxCount, buffer.buffered)))
            }
            guard d.got == 0 && !sawEOF else {
                largeRead = nil
                guard case .chunk(let region) = d.memory, d.got > 0 else { return .done(ByteView()) }
                statistics.directReads += 1
                statistics.bytesDelivered += d.got
                releaseTail(of: region, after: d.got)
                return .done(ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: d.got), owner: region))
            }
            guard case .chunk(let region) = d.memory else { preconditionFailure("read(upTo:) resumed another read") }
            return .need(.largeRead(dst: UnsafeMutableRawBufferPointer(start: region.base, count: d.count), minimum: 1, slot: region.slot))
        }
        if buffer.buffered > 0 { return .done(try deliver(min(maxCount, buffer.buffered))) }
        if sawEOF { return .done(ByteView()) }
        if maxCount >= largeReadThreshold {
            // A fresh block has nothing resident: the kernel commits the pages it writes, and
            // nothing more.
            let size = min(maxCount, max(4 << 20, buffer.nominalCapacity))
            let region = Region(block: try pool.take(atLeast: size), pool: pool)
            largeRead = LargeRead(memory: .chunk(region), count: size, got: 0)
            return .need(.largeRead(dst: UnsafeMutableRawBufferPointer(start: region.base, count: size), minimum: 1, slot: region.slot))
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
        if var d = largeRead {
            if buffer.buffered > 0 && d.got < d.count {
                d.got += copyOut(into: dst.baseAddress! + d.got, max: d.count - d.got)
                largeRead = d
            }
            if d.got < d.count && !sawEOF {
                return .need(.largeRead(dst: UnsafeMutableRawBufferPointer(rebasing: dst[d.got...]), minimum: d.count - d.got, slot: slot))
            }
            largeRead = nil
            statistics.bytesDelivered += d.got
            if d.got < count { throw incomplete(dst, d.got) }
            return .done(())
        }
        let base = dst.baseAddress!
        if count - buffer.buffered < largeReadThreshold {
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
        largeRead = LargeRead(memory: .caller(base, slot: slot), count: count, got: done)
        return .need(.largeRead(dst: UnsafeMutableRawBufferPointer(rebasing: dst[done...]), minimum: count - done, slot: slot))
    }

    // MARK: - Bodies

    /// `count` bytes that follow `skip` buffered bytes (a length prefix); both are consumed only
    /// when the body is there or the stream ended.
    mutating func body(_ count: Int, after skip: Int) throws -> CoreStep<ByteView> {
        if largeRead != nil { return try largeReadStep() }
        if skip + count <= buffer.buffered {
            // The fast path: a view into the buffer, no allocation, no copy.
            buffer.consume(skip)
            return .done(try deliver(count))
        }
        if count < largeReadThreshold {
            if !sawEOF {
                readAhead = buffer.nominalCapacity  // small reads: read ahead as far as staging goes
                return .need(.buffered(skip + count))
            }
            buffer.consume(skip)
            throw ExactReadError.incomplete(partial: try deliver(buffer.buffered), expected: count)
        }
        return try startLargeRead(count, after: skip)
    }

    // MARK: - The fast path

    /// The buffered run, the prefix width and the body length of the next frame when all of it
    /// is in that run and the fast path may take it; nil when the slow path must decide.
    @inline(__always)
    func stagedFrameBounds<D: PrefixDecoder>(_ decoder: D) -> (bytes: UnsafeRawBufferPointer, width: Int, count: Int)? {
        guard largeRead == nil, !skippingVarint else { return nil }
        let bytes = buffer.contiguousReadable
        guard case .length(let length, let width) = decoder.scan(bytes),
            let count = fastBodyLength(length, width: width, available: bytes.count)
        else { return nil }
        return (bytes, width, count)
    }

    /// The body length a prefix announces when it is within the limits and `available` bytes
    /// (prefix included) hold the whole frame; nil when the slow path must decide.
    @inline(__always)
    private func fastBodyLength(_ length: UInt64, width: Int, available: Int) -> Int? {
        guard length <= UInt64(maxFrameLength) else { return nil }
        // No overflow trap: a wrapped (negative) count goes to the slow path, which computes it
        // exactly and refuses it.
        let count = Int(length) &+ lengthAdjustment &- (lengthIncludesPrefix ? width : 0)
        guard count >= 0, count <= maxFrameLength, count <= available &- width else { return nil }
        return count
    }

    /// The prefix width and body length of the next frame when all of it is buffered, in one
    /// run or across segments (a loop reader's frame that spans two receive buffers); nil when
    /// the slow path must decide, as for `stagedFrameBounds`.
    func bufferedFrameBounds<D: PrefixDecoder>(_ decoder: D) -> (width: Int, count: Int)? {
        guard largeRead == nil, !skippingVarint else { return nil }
        guard case .length(let length, let width) = scanPrefix(decoder),
            let count = fastBodyLength(length, width: width, available: buffer.buffered)
        else { return nil }
        return (width, count)
    }

    /// Consumes the prefix of the frame `bufferedFrameBounds` found (its body follows).
    mutating func takeBufferedPrefix(_ width: Int) {
        buffer.consume(width)
    }

    /// Consumes the next `count` bytes (buffered, across segments), copied to `dst` (`count`
    /// bytes of room): one copy, counted in `bytesCopied`.
    mutating func copyBufferedBody(_ count: Int, into dst: UnsafeMutableRawPointer) {
        _ = copyOut(into: dst, max: count)
        statistics.bytesDelivered &+= count
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
        takeStagedFrame(AnyPrefix(prefix: prefix))
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
        stagedFrame(AnyPrefix(prefix: prefix))
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
        guard largeRead == nil else { return nil }
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

    /// Decodes a length prefix without consuming it (`PrefixDecoding`). An over-long varint is
    /// refused with `frameTooLarge(length: UInt64.max, …)` once its last byte (the first without
    /// the continuation bit) or the end of the stream is reached; its bytes are consumed as they
    /// are scanned, each once (counted in `statistics.bytesSkipped`), so a peer that trickles an
    /// endless prefix costs constant memory and linear time. An `Errno` while looking for its
    /// end leaves the skip where it stands: the next varint frame read resumes it (any other
    /// read starts at the current position and ends the skip).
    mutating func decode(_ prefix: LengthPrefix) throws -> Decoded {
        if prefix == .varint && skippingVarint { return try skipOverlongVarint() }
        switch scanPrefix(AnyPrefix(prefix: prefix)) {
        case .length(let value, let width):
            return .length(value, width)
        case .needMore(let n):
            if !sawEOF { return .need(n) }
            if buffer.buffered == 0 { return .endOfStream }
            throw ExactReadError.incomplete(partial: try deliver(buffer.buffered), expected: n)
        case .overlong(let continues):
            buffer.consume(10)
            statistics.bytesSkipped += 10
            guard continues else { throw ExactReadError.frameTooLarge(length: .max, limit: maxFrameLength) }
            skippingVarint = true
            return try skipOverlongVarint()
        }
    }

    /// Scans the prefix at the front of the buffer: in place when its bytes are contiguous,
    /// else over a copy of the first ten (the longest prefix) gathered across segments.
    private func scanPrefix<D: PrefixDecoder>(_ decoder: D) -> PrefixScan {
        let run = buffer.contiguousReadable
        if run.count >= 10 || run.count == buffer.buffered { return decoder.scan(run) }
        var window: (UInt64, UInt64) = (0, 0)
        let n = min(10, buffer.buffered)
        return withUnsafeMutableBytes(of: &window) { raw in
            for i in 0..<n { raw[i] = buffer.byte(at: i) }
            return decoder.scan(UnsafeRawBufferPointer(rebasing: raw[0..<n]))
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

}
