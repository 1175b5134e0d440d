import SystemPackage

// O_DIRECT files: aligned reads at explicit offsets straight into the reader's memory, a bounce
// block for unaligned heads and tails, and when a reader may use it.

/// Reads a regular file opened with `O_DIRECT` as a stream: every request the kernel sees is
/// aligned (file offset, length and memory address, to `alignment`), at explicit offsets from
/// the file position the reader started at.
///
/// A destination whose address has the phase of the next byte's file offset (mod
/// `alignment`) gets the kernel's bytes directly — whole blocks, in flight with io_uring —
/// with no CPU copy; the reader places staging and frame memory that way (`phase`). What does
/// not fit whole blocks (a frame's unaligned tail, a destination out of phase) goes through a
/// one-block bounce buffer and is copied (counted in `EngineResult.copied`); the block's other
/// bytes stay in the bounce buffer for the next read. The file's last, partial block is read
/// like any other (the kernel returns the bytes up to the end).
final class ODirectEngine: IOEngine {
    let inner: any IOEngine
    let fd: FileDescriptor
    let alignment: Int
    /// File offset of the next byte the kernel will be asked for (aligned until the end).
    private(set) var position: Int64
    /// The bounce block: bytes `[bounceStart, bounceEnd)` are file bytes just before
    /// `position`, read but not delivered yet.
    private let bounce: UnsafeMutableRawPointer
    private var bounceStart = 0
    private var bounceEnd = 0
    /// A read returned fewer bytes than asked: the file ended.
    private var atEnd = false
    /// Bytes past the end of the next read's destination that may be written too (set by the
    /// reader for a frame's read: its region's free tail; used once, then 0). Lets the frame's
    /// last partial block be read whole with the body, in the same request.
    var overreadRoom = 0
    /// The largest read that may take its last block whole (see `read`). Larger ones read the
    /// last block apart: a single 512 MiB READ_FIXED ending in a region's free tail made a
    /// virtio-blk kernel (6.18) fault in __blk_rq_map_sg (commit a07b5fb).
    static let overreadLimit = 2 << 20

    /// `start`: the descriptor's position when the reader was created; its aligned-down
    /// block is read and the bytes before `start` are dropped.
    init(inner: any IOEngine, fd: FileDescriptor, alignment: Int, start: Int64, probe: Bool = false) throws(Errno) {
        self.inner = inner
        self.fd = fd
        self.alignment = alignment
        guard let b = aligned_alloc(alignment, alignment) else { throw .noMemory }
        self.bounce = b
        let a = Int64(alignment)
        self.position = start / a * a
        let skip = Int(start - position)
        if skip > 0 || probe {
            // Start inside a block: read it, keep the bytes from `start` on.
            let r = inner.read(
                into: UnsafeMutableRawBufferPointer(start: bounce, count: alignment), atLeast: 1, slot: -1,
                offset: position, deadline: 0)
            // `bounce` is freed by deinit, which runs when this initializer throws (every
            // stored property is set by now): freeing it here too was a double free.
            if let e = r.error { throw e }
            if skip > 0 {
                position += Int64(r.count)
                if r.count < alignment { atEnd = true }
                bounceStart = min(skip, r.count)
                bounceEnd = r.count
            }
            // A probe from a block boundary keeps nothing: the first read then goes straight
            // into the reader's memory, with no copy.
        }
    }

    deinit { free(bounce) }

    var kind: ExactReader.Backend { inner.kind }
    var degradation: String? { inner.degradation }
    /// A regular file is always readable (reads return data or the end at once).
    func readiness() -> Readiness { .readable }

    /// The address phase (mod `alignment`) at which the next delivered byte should land.
    var phase: Int {
        let next = position - Int64(bounceEnd - bounceStart)
        return Int(next % Int64(alignment))
    }

    func read(
        into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32, offset: Int64, deadline: Int64
    ) -> EngineResult {
        precondition(offset < 0, "positional reads of an O_DIRECT file go through ExactReader.readDirect")
        var result = EngineResult()
        guard let base = dst.baseAddress, dst.count > 0 else { return result }
        var done = 0
        if bounceEnd > bounceStart {
            let n = min(bounceEnd - bounceStart, dst.count)
            base.copyMemory(from: bounce + bounceStart, byteCount: n)
            bounceStart += n
            done = n
            result.copied += n
        }
        let a = alignment
        let spare = overreadRoom
        overreadRoom = 0
        while done < max(minimum, 1) && !atEnd {
            let p = base + done
            let room = dst.count - done
            let tail = room % a
            // Only for requests under `overreadLimit`: larger ones keep the one-block tail read.
            if Int(bitPattern: p) % a == 0 && tail > 0 && spare >= a - tail && room < Self.overreadLimit {
                // In phase, and the memory after the destination may take the rest of its last
                // block: body and last block in one request; the bytes past the destination
                // (the next frame's first ones) go to the bounce buffer.
                let whole = room - tail + a
                let r = inner.read(
                    into: UnsafeMutableRawBufferPointer(start: p, count: whole), atLeast: 1, slot: slot,
                    offset: position, deadline: deadline)
                merge(r, into: &result)
                position += Int64(r.count)
                let mine = min(r.count, room)
                let over = r.count - mine
                if over > 0 {
                    bounce.copyMemory(from: p + room, byteCount: over)
                    result.copied += over
                }
                bounceStart = 0
                bounceEnd = over
                done += mine
                if r.error != nil { break }
                if r.count < whole && (r.count == 0 || r.count % a != 0) { atEnd = true }
                if r.count < whole { continue }
                break
            }
            if Int(bitPattern: p) % a == 0 && room >= a {
                // In phase: whole blocks straight into the destination.
                let bulk = room / a * a
                let r = inner.read(
                    into: UnsafeMutableRawBufferPointer(start: p, count: bulk), atLeast: 1, slot: slot,
                    offset: position, deadline: deadline)
                merge(r, into: &result)
                position += Int64(r.count)
                done += r.count
                if r.error != nil { break }
                if r.count < bulk && (r.count == 0 || r.count % a != 0) { atEnd = true }
            } else {
                // A head or tail that is not whole blocks, or memory out of phase: one block
                // through the bounce buffer.
                let r = inner.read(
                    into: UnsafeMutableRawBufferPointer(start: bounce, count: a), atLeast: 1, slot: -1,
                    offset: position, deadline: deadline)
                merge(r, into: &result)
                position += Int64(r.count)
                let n = min(r.count, room)
                p.copyMemory(from: bounce, byteCount: n)
                result.copied += n
                done += n
                bounceStart = n
                bounceEnd = r.count
                // The error first: a short read that failed is not the end of the file (taken
                // for it, a failed tail read made the next read a silent end of stream).
                if r.error != nil { break }
                if r.count < a { atEnd = true }
            }
        }
        result.count = done
        return result
    }

    private func merge(_ r: EngineResult, into result: inout EngineResult) {
        result.reads += r.reads
        result.fixedReads += r.fixedReads
        result.polls += r.polls
        result.copied += r.copied
        if r.destinationPoisoned { result.destinationPoisoned = true }
        if let e = r.error { result.error = e }
    }
}

#if os(Linux)
import CExactIOLinux

extension ODirectEngine {
    /// The engine for `fd` given `options`: `engine` itself, or a `ODirectEngine` over it for
    /// a regular file read with O_DIRECT (opened with it, or `Options.directIO`). The reason,
    /// when O_DIRECT was wanted and is not used (the descriptor then reads through the page
    /// cache: O_DIRECT is turned off on it if it was on).
    static func wrap(_ engine: any IOEngine, fd: FileDescriptor, fileType: mode_t, options: ExactReader.Options)
        -> (engine: any IOEngine, direct: ODirectEngine?, reason: String?)
    {
        guard fileType == S_IFREG || fileType == S_IFBLK else {
            return (engine, nil, options.directIO ? "O_DIRECT not used: not a regular file or block device" : nil)
        }
        let has = cexactio_has_direct(fd.rawValue)
        guard has == 1 || options.directIO else { return (engine, nil, nil) }
        var turnedOn = false
        if has != 1 {
            let r = cexactio_set_direct(fd.rawValue, 1)
            if r < 0 {
                return (engine, nil, "O_DIRECT not used: fcntl(F_SETFL, O_DIRECT) failed: \(BackendSelection.describe(Errno(rawValue: -r))); reading through the page cache")
            }
            turnedOn = true
        }
        func refuse(_ why: String) -> (engine: any IOEngine, direct: ODirectEngine?, reason: String?) {
            _ = cexactio_set_direct(fd.rawValue, 0)
            return (engine, nil, "O_DIRECT not used: \(why); reading through the page cache"
                + (turnedOn ? "" : " (O_DIRECT turned off on the descriptor)"))
        }
        var memAlign: UInt32 = 0
        var offsetAlign: UInt32 = 0
        var alignment = 4096
        if cexactio_dio_alignment(fd.rawValue, &memAlign, &offsetAlign) == 0 {
            if offsetAlign == 0 { return refuse("the filesystem does not support direct I/O (statx: no DIO alignment)") }
            alignment = Int(max(memAlign, offsetAlign))
        }
        guard alignment > 0, alignment & (alignment - 1) == 0, alignment <= Block.pageSize else {
            return refuse("unsupported direct I/O alignment \(alignment)")
        }
        let start = lseek(fd.rawValue, 0, SEEK_CUR)
        if start < 0 { return refuse("lseek failed: \(BackendSelection.describe(Errno(rawValue: errno)))") }
        do {
            // The first block is read now: a filesystem that takes the flag but refuses aligned
            // reads (EINVAL) is found here, not in the middle of a frame.
            let d = try ODirectEngine(inner: engine, fd: fd, alignment: alignment, start: Int64(start), probe: true)
            return (d, d, nil)
        } catch {
            return refuse("the first aligned read failed: \(BackendSelection.describe(error))")
        }
    }
}
#endif
