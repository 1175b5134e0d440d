import SystemPackage

// Files: positional reads, and bodies larger than memory in chunks.

extension ExactReader {
    /// Reads exactly `count` bytes at file offset `offset` (`pread(2)` semantics): neither the
    /// descriptor's file position nor the reader's stream (what is staged, where the next
    /// `readFrame` starts) moves, so positional reads mix freely with stream reads — an index,
    /// then records by offset.
    ///
    /// The result has the guarantees of `readExactly(_:)`: a read-only view of the memory the
    /// kernel wrote into (no copy; registered memory with io_uring from 64 KiB on). Small reads
    /// use heap memory of their own; large ones, the reader's pool.
    ///
    /// - Parameters:
    ///   - count: Bytes to read, `>= 0`.
    ///   - offset: File offset of the first byte, `>= 0`.
    /// - Throws: `Errno.illegalSeek` when the descriptor is not a regular file or a block device;
    ///   `ExactReadError.incomplete(partial:expected:)` when the file ends first (`partial`:
    ///   the bytes up to its end); `Errno` on a system failure (`Errno.noMemory` when memory
    ///   for `count` bytes cannot be mapped).
    public func readExactly(_ count: Int, at offset: Int64) throws -> ByteView {
        precondition(count >= 0, "readExactly(_:at:): count must not be negative (got \(count))")
        precondition(offset >= 0, "readExactly(_:at:): offset must not be negative (got \(offset))")
        guard fileType == S_IFREG || fileType == S_IFBLK else { throw Errno.illegalSeek }
        if let e = core.brokenError { throw e }
        if count == 0 { return ByteView() }
        if let d = oDirectEngine { return try readDirect(count, at: offset, alignment: d.alignment, inner: d.inner) }
        if count < Self.positionalPoolThreshold { return try readRecord(count, at: offset) }
        // Resident and registered (within the budget): READ_FIXED, and pooled blocks come back
        // warm for the next read of this size.
        let region = try pool.residentRegion(atLeast: count, register: true)
        let dst = UnsafeMutableRawBufferPointer(start: region.base, count: count)
        let r = engine.read(into: dst, atLeast: count, slot: region.slot, offset: offset, deadline: 0)
        if r.destinationPoisoned { region.quarantine() }
        core.count(r)
        if let e = r.error { throw e }
        return try positionalResult(region.base, r.count, owner: region, expected: count)
    }

    /// The end of every positional read: the `got` bytes at `base` (kept alive by `owner`) as
    /// the view, or `incomplete` with them when the file ended before `count`.
    func positionalResult(_ base: UnsafeRawPointer, _ got: Int, owner: AnyObject, expected count: Int) throws -> ByteView {
        core.statistics.bytesDelivered &+= got
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: base, count: got), owner: owner)
        guard got == count else {
            throw ExactReadError.incomplete(partial: got == 0 ? ByteView() : view, expected: count)
        }
        core.statistics.directReads &+= 1
        return view
    }

    /// A small positional read: pread(2) on both backends (one synchronous read gains nothing
    /// from a ring; a submission plus a wait cost more than the syscall: measured with bench's
    /// `random` case, io_uring 0.59x a C pread loop, pread 0.9x), into one heap object that is
    /// both the memory and its owner (one allocation per record).
    func readRecord(_ count: Int, at offset: Int64) throws -> ByteView {
        let storage = RecordStorage.create(minimumCapacity: count) { _ in () }
        // Safety: a ManagedBuffer's elements stay at one address for the object's lifetime,
        // and the view keeps the object.
        let base = storage.withUnsafeMutablePointerToElements { UnsafeMutableRawPointer($0) }
        var got = 0
        while got < count {
            core.statistics.reads &+= 1
            let n = pread(fileDescriptor.rawValue, base + got, count - got, off_t(offset) + off_t(got))
            if n > 0 {
                got += n
            } else if n == 0 {
                break
            } else if errno != EINTR {
                throw Errno(rawValue: errno)
            }
        }
        return try positionalResult(base, got, owner: storage, expected: count)
    }

    /// `readExactly(_:at:)` with O_DIRECT: the aligned blocks around the range are read into
    /// page-aligned memory of their own and the view starts inside it (no copy).
    func readDirect(_ count: Int, at offset: Int64, alignment: Int, inner: any IOEngine) throws -> ByteView {
        let a = Int64(alignment)
        let start = offset / a * a
        let head = Int(offset - start)
        let (span, o1) = (head).addingReportingOverflow(count)
        let (rounded, o2) = span.addingReportingOverflow(alignment - 1)
        if o1 || o2 { throw Errno.noMemory }
        let length = rounded / alignment * alignment
        let region = try pool.residentRegion(atLeast: length, register: true)
        var got = 0
        var result: Errno? = nil
        while got < length {
            let r = inner.read(
                into: UnsafeMutableRawBufferPointer(start: region.base + got, count: length - got), atLeast: 1,
                slot: region.slot, offset: start + Int64(got), deadline: 0)
            if r.destinationPoisoned { region.quarantine() }
            core.count(r)
            got += r.count
            if let e = r.error { result = e; break }
            if r.count == 0 || r.count % alignment != 0 { break }  // the end of the file
        }
        if let e = result { throw e }
        return try positionalResult(region.base + head, max(0, min(got - head, count)), owner: region, expected: count)
    }

    /// Positional reads below this size use heap memory of their own and pread(2); from it,
    /// pooled (and registered) blocks and the reader's engine.
    static let positionalPoolThreshold = 64 << 10

    /// The next `count` bytes of the stream as a sequence of views of at most `maxChunk` bytes
    /// each, read one at a time: for bodies larger than memory (snapshots, blobs, backups),
    /// processed in O(`maxChunk`) memory.
    ///
    /// ```swift
    /// var chunks = reader.chunks(of: bodyLength, maxChunk: 4 << 20)
    /// while let chunk = try chunks.next() {
    ///     try output.writeAll(chunk)   // drop the chunk before asking for the next
    /// }
    /// ```
    ///
    /// Each chunk is read by `next()` when it is asked for, with `readExactly`'s memory and
    /// copy contract; a chunk's memory returns to the reader's pool when its view is released,
    /// so a loop that lets each chunk go before the next reuses one block of `maxChunk` bytes.
    /// (A kept chunk keeps its memory, as any view does.)
    ///
    /// - Parameters:
    ///   - count: Bytes of the stream the sequence covers, `>= 0`.
    ///   - maxChunk: The largest chunk, `>= 1`. Use a multiple of the page size of at least a
    ///     quarter of `Options.stagingCapacity` for large bodies: each chunk then goes straight
    ///     from the kernel into its memory.
    public func chunks(of count: Int, maxChunk: Int) -> Chunks {
        precondition(count >= 0, "chunks(of:maxChunk:): count must not be negative (got \(count))")
        precondition(maxChunk >= 1, "chunks(of:maxChunk:): maxChunk must be at least 1 (got \(maxChunk))")
        return Chunks(reader: self, count: count, maxChunk: maxChunk)
    }

    /// The chunks of a body, read one by one (see `chunks(of:maxChunk:)`). Not `Sendable`: it
    /// reads through its reader.
    public struct Chunks {
        let reader: ExactReader
        /// Bytes of the stream the chunks cover.
        public let count: Int
        /// The largest chunk.
        public let maxChunk: Int
        /// Bytes delivered by `next()` so far (whole chunks; an error's partial bytes are not
        /// counted here, they are in the error).
        public private(set) var delivered = 0

        init(reader: ExactReader, count: Int, maxChunk: Int) {
            self.reader = reader
            self.count = count
            self.maxChunk = maxChunk
        }

        /// Bytes not yet delivered.
        public var remaining: Int { count - delivered }

        /// The next chunk (`min(maxChunk, remaining)` bytes), or nil once all `count` bytes were
        /// delivered.
        ///
        /// - Throws: as `readExactly(_:)`: `ExactReadError.incomplete(partial:expected:)` when the
        ///   stream ends inside this chunk (`partial`: the chunk's bytes that arrived,
        ///   `expected`: the chunk's size; `delivered + partial.count` bytes of the body arrived
        ///   in all); an `Errno` leaves the chunk's bytes buffered, and calling `next()` again
        ///   retries it.
        public mutating func next() throws -> ByteView? {
            guard delivered < count else { return nil }
            let chunk = try reader.readExactly(min(maxChunk, count - delivered))
            delivered += chunk.count
            return chunk
        }
    }
}

/// The memory of a small positional read and its owner in one object.
typealias RecordStorage = ManagedBuffer<Void, UInt8>
