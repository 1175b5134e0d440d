import SystemPackage

// Large reads: a body of at least a quarter of the staging capacity goes straight into memory
// of its own (the staged prefix copied in front, then the kernel writes the rest), with that
// memory committed as bytes arrive, and O_DIRECT's alignment where the engine needs it.

/// A large read in progress: where its bytes go and how many arrived.
struct LargeRead {
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

extension ReaderCore {
    /// A large read: the buffered prefix is copied into memory of the frame's own, then the
    /// kernel writes the rest straight there. Memory is committed a window ahead of the bytes
    /// (as much again as has arrived, 64 KiB to 16 MiB), so a length alone costs 64 KiB.
    mutating func startLargeRead(_ count: Int, after skip: Int) throws -> CoreStep<ByteView> {
        let staged = buffer.buffered - skip
        if sawEOF {
            buffer.consume(skip)
            throw ExactReadError.incomplete(partial: try deliver(staged), expected: count)
        }
        // Frames larger than staging: read ahead only a page for the next prefix, so that little
        // of the next body is staged (and copied) before its own large read.
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
        var d: LargeRead
        if front == Self.frontRoom, let resumed = try buffer.resumeFrame(after: skip, frontRoom: front, needed: needed) {
            // A retry of a frame whose read failed: its bytes are already where they belong.
            d = LargeRead(memory: .frame(resumed), count: count, got: staged)
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
            d = LargeRead(memory: .frame(region), count: count, got: copyOut(into: region.base + front, max: min(staged, count)))
        }
        d.prefix = prefix
        d.prefixWidth = skip
        d.front = front
        largeRead = d
        if d.got < count { statistics.directReads += 1 }
        return try largeReadStep()
    }

    /// The next request of the large read in progress, or its result.
    mutating func largeReadStep() throws -> CoreStep<ByteView> {
        guard var d = largeRead, case .frame(let region) = d.memory else { preconditionFailure("no frame read in progress") }
        let front = d.front
        if buffer.buffered > 0 && d.got < d.count {
            // Bytes that arrived in the buffer meanwhile (an event loop's receive) come first.
            region.commit(upTo: front + min(d.count, d.got + buffer.buffered))
            d.got += copyOut(into: region.base + front + d.got, max: d.count - d.got)
            largeRead = d
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
            return .need(.largeRead(
                dst: UnsafeMutableRawBufferPointer(start: region.base + front + d.got, count: d.count - d.got),
                minimum: target - d.got, slot: region.slot))
        }
        largeRead = nil
        releaseTail(of: region, after: front + d.got)
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base + front, count: d.got), owner: region)
        statistics.bytesDelivered += d.got
        if d.got < d.count {
            throw ExactReadError.incomplete(partial: d.got == 0 ? ByteView() : view, expected: d.count)
        }
        return .done(view)
    }

    /// Gives back the pages of `region` past `end` that no view can reference, when they are
    /// worth a syscall (at least 64 KiB and an eighth of what is used).
    func releaseTail(of region: Region, after end: Int) {
        let tail = region.capacity - Block.roundUpToPage(end)
        guard tail >= max(64 << 10, end / 8), region.resident > end else { return }
        region.decommit(end, region.capacity, pool: pool)
    }
}
