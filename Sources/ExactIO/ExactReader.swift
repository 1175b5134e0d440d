import Glibc
import SystemPackage

/// Reads exactly n bytes, or length-prefixed frames, from a socket, pipe or file, with one
/// copy of each byte (the kernel's) and a peak memory of n, and returns read-only views of
/// the memory the bytes landed in.
///
/// ```swift
/// let reader = try ExactReader(socket)
/// while let frame = try reader.readFrame() {   // 4-byte big-endian length, then the body
///     handle(frame)                             // a ByteView: no copy, safe to keep or send
/// }
/// ```
///
/// How bytes travel: small reads are served from a read-ahead staging buffer (one syscall
/// serves many frames; when enough is already staged, the result is a view into staging with
/// no allocation and no copy). A read of at least a quarter of the staging capacity copies
/// the bytes already staged (at most the staging capacity) into the frame's own memory and
/// has the kernel write the rest straight there: READ_FIXED into registered memory with
/// io_uring, READ (or `read(2)`) otherwise. Memory is committed as bytes arrive, not when a
/// length is announced. Memory that a live view references is never written again; it
/// returns to a per-reader pool when the last view goes.
///
/// The descriptor is borrowed, never closed. It may be blocking or non-blocking (the reader
/// waits for readiness). Sockets must be `SOCK_STREAM`. A reader has one owner at a time: it
/// is not `Sendable`; the views it returns are.
public final class ExactReader {
    /// The descriptor read from (borrowed).
    public let fileDescriptor: FileDescriptor
    /// The options the reader was created with.
    public let options: Options
    /// The backend in use after any fallback: `.ioUring` or `.posix`.
    public var backend: Backend { engine.kind }
    /// Why io_uring, or part of it, is not used: nil when the reader runs on io_uring with
    /// registered buffers. With `backend == .posix`, the step that failed and its errno (for
    /// example "io_uring_setup failed: Operation not permitted (errno 1)" under a container's
    /// seccomp profile). With `backend == .ioUring`, why reads go to unregistered memory
    /// (for example RLIMIT_MEMLOCK too small to register buffers).
    public var fallbackReason: String? { engine.degradation ?? setupReason }
    /// Counters since creation.
    public internal(set) var statistics = Statistics()

    let engine: any IOEngine
    let pool: MemoryPool
    let setupReason: String?
    var staging: StagingBuffer
    /// Reads of at least this many bytes go straight to their final memory.
    let directThreshold: Int
    /// The stream returned end-of-file (sticky: later reads do not retry).
    var sawEOF = false
    /// An error met by `isAtEOF`'s read-ahead, for the next read to throw.
    var pendingError: Errno? = nil
    /// Set when the io_uring ring broke with a request that could not be cancelled: every
    /// later call throws it (the stream position is unknown).
    var brokenError: Errno? = nil
    /// How far a staging fill reads beyond what it needs: the whole free tail while frames are
    /// small, one page after a frame larger than staging (see `readDirect`).
    var readAhead: Int
    /// The deadline of the call in progress (CLOCK_MONOTONIC ns), 0 for none.
    var deadline: Int64 = 0
    /// Caller memory registered with `register(_:)`.
    var callerBuffers: [(base: UnsafeMutableRawPointer, count: Int, slot: RegisteredSlot)] = []

    /// Creates a reader over `fd` (borrowed: the reader never closes it).
    ///
    /// - Parameters:
    ///   - fd: A stream socket, pipe, FIFO, character device or regular file, blocking or not.
    ///   - options: Backend choice, staging capacity, frame limit; defaults for all.
    /// - Throws: `InvalidOptionError` for an option out of range; `Errno` when `fd` is not an
    ///   open descriptor (`fstat` fails), when it is a datagram or sequenced-packet socket
    ///   (`Errno.protocolWrongTypeForSocket`: ExactIO reads byte streams), when the staging
    ///   buffer cannot be mapped (`Errno.noMemory`), or when `.ioUring` was demanded and
    ///   io_uring cannot be set up.
    public convenience init(_ fd: FileDescriptor, options: Options = Options()) throws {
        try self.init(fd: fd, options: options, syscalls: nil, environment: Self.processEnvironment())
    }

    /// The designated initializer; `syscalls` scripts the POSIX backend in tests.
    init(fd: FileDescriptor, options: Options, syscalls: PosixSyscalls?, environment: [String: String]) throws {
        try options.validate()
        let setup = try BackendSelection.make(fd: fd, options: options, syscalls: syscalls, environment: environment)
        self.fileDescriptor = fd
        self.options = options
        self.engine = setup.engine
        self.pool = setup.pool
        // The staging buffer is the first block: mapped (and registered) now, so that a
        // registration refusal is known and reported from the start.
        self.staging = try StagingBuffer(pool: setup.pool, capacity: options.stagingCapacity)
        self.directThreshold = max(1, staging.nominalCapacity / 4)
        self.readAhead = staging.nominalCapacity
        var reason = setup.fallbackReason
        if reason == nil, setup.pool.hasRegistrar, staging.region.slot < 0, let refusal = setup.pool.lastRefusal {
            reason = BackendSelection.describe(
                refusal, what: "the staging buffer", bytes: staging.nominalCapacity)
        }
        self.setupReason = reason
    }

    /// A reader whose every read is answered by `read` instead of a descriptor: for fuzzing
    /// and fault injection from outside the package (`@_spi(Testing) import ExactIO`). `read`
    /// returns bytes written into the buffer (0 = end of stream) or an errno; EINTR and EAGAIN
    /// are retried as for a descriptor. Uses the POSIX backend's logic. `allowAllocation`, when
    /// given, is asked before every block of memory the reader maps (its size in bytes):
    /// false makes that allocation fail with `Errno.noMemory`.
    @_spi(Testing)
    public convenience init(
        options: Options = Options(),
        testingRead read: @escaping @Sendable (UnsafeMutableRawBufferPointer) -> Result<Int, Errno>,
        allowAllocation: (@Sendable (Int) -> Bool)? = nil
    ) throws {
        let syscalls = PosixSyscalls(read: { _, buffer, _ in read(buffer) }, waitReadable: { _, _ in .success(true) })
        try self.init(fd: FileDescriptor(rawValue: -1), options: options, syscalls: syscalls, environment: [:])
        pool.allocationFilter = allowAllocation
    }

    /// Blocks the reader has mapped and not yet unmapped (in use by it or its views, or pooled).
    @_spi(Testing)
    public var liveBlockCount: Int { pool.snapshot.liveBlocks }

    deinit {
        for buffer in callerBuffers { pool.unregisterExternal(buffer.slot) }
        // Views may keep the staging buffer: it keeps only the pages they can reference.
        staging.retire()
        pool.close()
    }

    static func processEnvironment() -> [String: String] {
        var env: [String: String] = [:]
        if let value = getenv(BackendSelection.environmentVariable) {
            env[BackendSelection.environmentVariable] = String(cString: value)
        }
        return env
    }

    /// True when the stream has ended and every byte of it was consumed.
    ///
    /// Never blocks: with nothing buffered and no end seen yet, it asks the kernel whether the
    /// descriptor is readable right now (`poll` with a zero timeout) and, if so, reads ahead
    /// into staging to find out. A failure met that way (including a descriptor that is no
    /// longer open: `Errno.badFileDescriptor`) is thrown by the next read.
    public var isAtEOF: Bool {
        if staging.buffered > 0 || pendingError != nil || brokenError != nil { return false }
        if sawEOF { return true }
        switch engine.readiness() {
        case .notReadable:
            return false
        case .failed(let e):
            pendingError = e
            return false
        case .readable:
            deadline = 0
            do {
                _ = try fill(atLeast: 1)
            } catch {
                pendingError = error
                return false
            }
            return sawEOF && staging.buffered == 0
        }
    }

    /// Bytes read from the descriptor and not yet consumed.
    public var bufferedCount: Int { staging.buffered }

    /// Starts a public call: its deadline, and the error of a broken ring.
    @inline(__always)
    func beginCall() throws(Errno) {
        if let brokenError { throw brokenError }
        let timeout = options.timeoutNanoseconds
        deadline = timeout > 0 ? monotonicNanoseconds() + timeout : 0
    }

    // MARK: - Reading

    /// Reads exactly `count` bytes.
    ///
    /// When the staging buffer already holds `count` bytes, the result is a view into it: no
    /// allocation, no copy. Otherwise small reads fill staging (with read-ahead) and large ones
    /// go straight into the result's memory after the staged prefix.
    ///
    /// - Parameter count: Bytes to read, `>= 0` (a negative count is a programmer error).
    /// - Returns: A read-only view of exactly `count` bytes.
    /// - Throws: `ExactReadError.incomplete(partial:expected:)` when the stream ends first
    ///   (`partial` holds every byte that arrived); `Errno` on a system failure, with bytes
    ///   read before the failure buffered for the next read: `Errno.noMemory` when memory for
    ///   `count` bytes cannot be mapped (nothing is consumed), `Errno.timedOut` when
    ///   `Options.readTimeout` passes.
    public func readExactly(_ count: Int) throws -> ByteView {
        precondition(count >= 0, "readExactly: count must not be negative (got \(count))")
        if count <= staging.buffered { return deliverStaged(count) }
        try beginCall()
        return try readBody(count, after: 0)
    }

    /// Reads `count` bytes that follow the `skip` staged bytes (a frame's length prefix), and
    /// consumes both; on an `Errno` nothing is consumed (the prefix and whatever part of the
    /// body arrived stay buffered, in order).
    func readBody(_ count: Int, after skip: Int) throws -> ByteView {
        if count < directThreshold {
            readAhead = staging.nominalCapacity  // small reads: read ahead as far as staging goes
            if try fill(atLeast: skip + count) {
                staging.consume(skip)
                return deliverStaged(count)
            }
            staging.consume(skip)
            throw ExactReadError.incomplete(partial: deliverStaged(staging.buffered), expected: count)
        }
        return try readDirect(count, after: skip)
    }

    /// Fills all of `buffer` from the stream, writing straight into the caller's memory
    /// (after copying any bytes already staged). When `buffer` lies inside memory registered
    /// with `register(_:)`, io_uring reads it with READ_FIXED.
    ///
    /// - Throws: `ExactReadError.incomplete(partial:expected:)` when the stream ends first
    ///   (`partial` is a copy of the bytes that arrived, which are also at the start of
    ///   `buffer`); `Errno` on a system failure (the bytes read so far stay buffered in the
    ///   reader for the next read, and `buffer`'s content is then unspecified).
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        let count = buffer.count
        guard count > 0, let base = buffer.baseAddress else { return }
        try beginCall()
        if count - staging.buffered < directThreshold {
            // Small: staged first (nothing is consumed if the fill fails), then one copy out.
            let arrived = try fill(atLeast: count)
            let done = copyStaged(into: base, max: count)
            statistics.bytesDelivered += done
            if !arrived { throw incomplete(buffer, done) }
            return
        }
        // Large: the staged prefix, then the kernel writes the rest straight into `buffer`.
        var done = copyStaged(into: base, max: count)
        if !sawEOF {
            let slot = registeredSlot(containing: base + done, count: count - done)
            statistics.directReads += 1
            let r = engineRead(
                into: UnsafeMutableRawBufferPointer(start: base + done, count: count - done),
                atLeast: count - done, slot: slot)
            done += r.count
            if let error = r.error {
                // Keep what arrived: the bytes already in `buffer` go back in front of whatever
                // is still buffered, as the start of the stream for the next read (a copy: the
                // caller's memory is the caller's).
                if done > 0 {
                    statistics.bytesCopied += try staging.unconsume(UnsafeRawBufferPointer(rebasing: buffer[0..<done]))
                }
                throw error
            }
        }
        statistics.bytesDelivered += done
        if done < count {
            sawEOF = true
            throw incomplete(buffer, done)
        }
    }

    /// `incomplete` for a caller buffer: `partial` is a copy of the `done` bytes at its start
    /// (empty if even that copy cannot be allocated; the bytes are in `buffer` all the same).
    private func incomplete(_ buffer: UnsafeMutableRawBufferPointer, _ done: Int) -> ExactReadError {
        let partial = (try? ByteView(copying: UnsafeRawBufferPointer(rebasing: buffer[0..<done]))) ?? ByteView()
        return .incomplete(partial: partial, expected: buffer.count)
    }

    /// Reads exactly `count` bytes and lends them to `body` in place.
    ///
    /// - warning: The pointer is valid only inside `body`; do not escape it or write through
    ///   it. The bytes are consumed even when `body` throws.
    public func withExactly<R>(_ count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let view = try readExactly(count)
        return try view.withUnsafeBytes(body)
    }

    /// Reads between 1 and `maxCount` bytes: what is buffered, or else what one read brings.
    /// Returns an empty view only at end of stream (or when `maxCount` is 0).
    public func read(upTo maxCount: Int) throws -> ByteView {
        precondition(maxCount >= 0, "read(upTo:): maxCount must not be negative (got \(maxCount))")
        if maxCount == 0 { return ByteView() }
        if staging.buffered > 0 { return deliverStaged(min(maxCount, staging.buffered)) }
        try beginCall()
        if sawEOF { return ByteView() }
        if maxCount >= directThreshold {
            // Straight into memory of its own, up to 4 MiB per call. A fresh block has nothing
            // resident: the kernel commits the pages it writes, and nothing more.
            let size = min(maxCount, max(4 << 20, staging.nominalCapacity))
            let region = Region(block: try pool.take(atLeast: size), pool: pool)
            let r = engineRead(
                into: UnsafeMutableRawBufferPointer(start: region.base, count: size), atLeast: 1, slot: region.slot)
            if let error = r.error { throw error }  // count is 0 here: the loop stops at the first byte
            if r.count == 0 {
                sawEOF = true
                return ByteView()
            }
            statistics.directReads += 1
            statistics.bytesDelivered += r.count
            releaseTail(of: region, after: r.count)
            return ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: r.count), owner: region)
        }
        guard try fill(atLeast: 1) else { return ByteView() }
        return deliverStaged(min(maxCount, staging.buffered))
    }

    /// Reads and discards `count` bytes, using only the staging buffer's memory.
    ///
    /// - Throws: `ExactReadError.incomplete(partial:expected:)` with an empty `partial` and
    ///   `expected` = the bytes that could not be skipped, when the stream ends first; `Errno`
    ///   on a system failure (`statistics.bytesSkipped` tells how many were skipped by then).
    public func skip(_ count: Int) throws {
        precondition(count >= 0, "skip: count must not be negative (got \(count))")
        var left = count
        if left > staging.buffered {
            try beginCall()
            readAhead = staging.nominalCapacity  // skip reads as much as staging holds per read
        }
        while left > 0 {
            if staging.buffered == 0 {
                guard try fill(atLeast: 1) else {
                    throw ExactReadError.incomplete(partial: ByteView(), expected: left)
                }
            }
            let n = min(left, staging.buffered)
            staging.consume(n)
            statistics.bytesSkipped += n  // as it goes: after an Errno, it tells how far skip got
            left -= n
        }
    }

    /// Maps, faults in and (with io_uring, within the budget) registers memory for a frame of
    /// `byteCount` bytes now, and keeps it in the reader's pool, so that the first large read
    /// does not pay for page faults inside the read. Counts toward the process's memory from
    /// now on: this is the one call that commits memory ahead of data.
    ///
    /// For servers that know their frame sizes: the first 512 MiB frame otherwise spends about
    /// as long faulting in fresh pages as reading (measured on our 2-core VM).
    ///
    /// - Throws: `Errno.noMemory` when the memory cannot be mapped, or when `byteCount` is
    ///   more than the machine's physical memory (faulting it in would summon the OOM killer).
    public func reserve(_ byteCount: Int) throws {
        precondition(byteCount >= 0, "reserve: byteCount must not be negative (got \(byteCount))")
        guard byteCount >= directThreshold else { return }  // small reads use staging
        let physical = Int(clamping: sysconf(Int32(_SC_PHYS_PAGES))) &* Block.pageSize
        if physical > 0 && byteCount > physical { throw Errno.noMemory }
        _ = try pool.residentRegion(atLeast: Block.pageSize + byteCount, register: true)  // released at once: pooled
    }

    /// Returns the memory the reader keeps for its next frames (released frame blocks, up to
    /// 64 MiB plus the latest one) to the system. Views and the staging buffer are untouched.
    /// For servers with many idle connections that once read large frames.
    public func releaseCachedMemory() {
        pool.trim()
    }

    // MARK: - Caller memory

    /// Registers caller memory with the reader's io_uring ring, so that
    /// `readExactly(into:)` targeting it reads with READ_FIXED (no page pinning per read).
    ///
    /// The memory must stay valid until `unregister(_:)` or until the reader is gone.
    /// - Returns: true when registered; false on the POSIX backend, without registered
    ///   buffers, or over the registration budget (reads into it still work, unregistered).
    @discardableResult
    public func register(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard let base = buffer.baseAddress, buffer.count > 0,
              let slot = pool.registerExternal(base: base, count: buffer.count)
        else { return false }
        callerBuffers.append((base, buffer.count, slot))
        return true
    }

    /// Undoes `register(_:)` for exactly that buffer.
    public func unregister(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let i = callerBuffers.firstIndex(where: { $0.base == buffer.baseAddress && $0.count == buffer.count })
        else { return }
        pool.unregisterExternal(callerBuffers[i].slot)
        callerBuffers.remove(at: i)
    }

    func registeredSlot(containing start: UnsafeMutableRawPointer, count: Int) -> Int32 {
        for b in callerBuffers where start >= b.base && start + count <= b.base + b.count {
            return b.slot.index
        }
        return -1
    }

    // MARK: - Internals

    /// Every read from the descriptor goes through here: a failure `isAtEOF` met comes first;
    /// the engine's counters go to `statistics`.
    func engineRead(into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32) -> EngineResult {
        if let e = pendingError {
            pendingError = nil
            return EngineResult(error: e)
        }
        let r = engine.read(into: dst, atLeast: minimum, slot: slot, offset: -1, deadline: deadline)
        statistics.reads += r.reads
        statistics.fixedReads += r.fixedReads
        statistics.polls += r.polls
        if r.destinationPoisoned { brokenError = r.error ?? .notRecoverable }
        return r
    }

    /// A view of `count` staged bytes (the fast path: no allocation, no copy).
    func deliverStaged(_ count: Int) -> ByteView {
        if count == 0 { return ByteView() }
        statistics.bytesDelivered += count
        statistics.stagedViews += 1
        return staging.consumeView(count)
    }

    /// Copies up to `max` staged bytes to `dst`, consuming them; returns the count.
    func copyStaged(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        let n = min(max, staging.buffered)
        if n > 0 {
            dst.copyMemory(from: staging.readable.baseAddress!, byteCount: n)
            staging.consume(n)
            statistics.bytesCopied += n
        }
        return n
    }

    /// Makes `need` bytes buffered if the stream has them. Returns false at end of stream
    /// (with what did arrive still buffered).
    func fill(atLeast need: Int) throws(Errno) -> Bool {
        if staging.buffered >= need { return true }
        if sawEOF { return false }
        let missing = need - staging.buffered
        statistics.bytesCopied += try staging.makeRoom(forAppending: missing)
        let tail = staging.writable
        let ahead = min(tail.count, max(missing, readAhead))
        let r = engineRead(
            into: UnsafeMutableRawBufferPointer(rebasing: tail[0..<ahead]), atLeast: missing, slot: staging.region.slot)
        if r.destinationPoisoned {
            // The kernel may still write into the staging buffer's free tail: never use it again.
            staging.region.quarantine()
        }
        staging.commit(r.count)
        if let error = r.error { throw error }
        if r.count < missing {
            sawEOF = true
            return false
        }
        return true
    }

    /// The page left free in front of a large read's bytes: on an `Errno`, the frame's length
    /// prefix is written back there, so the bytes that arrived become the buffered start of
    /// the stream without being copied.
    static var frontRoom: Int { Block.pageSize }

    /// A large read: the staged prefix is copied into memory of the frame's own, then the
    /// kernel writes the rest straight there. Memory is committed a window ahead of the bytes
    /// (as much again as has arrived, 64 KiB to 16 MiB), so a length alone costs 64 KiB.
    func readDirect(_ count: Int, after skip: Int) throws -> ByteView {
        let staged = staging.buffered - skip
        if sawEOF {
            staging.consume(skip)
            throw ExactReadError.incomplete(partial: deliverStaged(staged), expected: count)
        }
        // Frames larger than staging: read ahead only a page for the next prefix, so that little
        // of the next body is staged (and copied) before its own direct read.
        readAhead = count >= staging.nominalCapacity ? Block.pageSize : staging.nominalCapacity
        let front = Self.frontRoom
        let (needed, overflow) = count.addingReportingOverflow(front)
        if overflow { throw Errno.noMemory }
        // The prefix being skipped, kept aside (at most 10 bytes) to put back on an Errno.
        var prefix: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &prefix) { p in
            p.baseAddress!.copyMemory(from: staging.readable.baseAddress!, byteCount: skip)
        }
        var got: Int
        let region: Region
        if let resumed = try staging.resumeFrame(after: skip, frontRoom: front, needed: needed) {
            // A retry of a frame whose read failed: its bytes are already where they belong.
            region = resumed
            got = staged
        } else {
            var block = try pool.take(atLeast: needed)  // throws before anything is consumed
            if block.slot == nil && block.resident >= needed
                && block.capacity - needed <= max(needed / 8, Block.hugePageSize) {
                // A pooled block whose pages an earlier frame made resident: register it, so that
                // this frame and the next ones are READ_FIXED.
                block.commit(upTo: block.capacity)
                pool.register(&block)
            }
            block.commit(upTo: front + staged)
            region = Region(block: block, pool: pool)
            got = copyStaged(into: region.base + front, max: staged.clamped(to: 0...count), after: skip)
        }
        var failure: Errno? = nil
        if got < count {
            statistics.directReads += 1
            while got < count {
                var target = count
                if region.slot < 0 && region.resident < needed {
                    let window = min(max(got, 64 << 10), 16 << 20)
                    region.commit(upTo: front + min(count, got + window))
                    target = min(count, region.resident - front)
                }
                let r = engineRead(
                    into: UnsafeMutableRawBufferPointer(start: region.base + front + got, count: count - got),
                    atLeast: target - got, slot: region.slot)
                got += r.count
                if r.destinationPoisoned { region.quarantine() }
                if let e = r.error {
                    failure = e
                    break
                }
                if got < target { break }  // end of stream
            }
        }
        if let failure {
            // Nothing is lost and nothing is copied: the bytes that arrived become the buffered
            // start of the stream, with the prefix written back in front of them.
            if brokenError == nil {
                staging.adopt(region, bytes: front, front + got)
                let back = withUnsafeBytes(of: &prefix) { staging.prepend(UnsafeRawBufferPointer(rebasing: $0[0..<skip])) }
                precondition(back, "the front room of a frame region is never viewed")
            }
            throw failure
        }
        releaseTail(of: region, after: front + got)
        let view = ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base + front, count: got), owner: region)
        statistics.bytesDelivered += got
        if got < count {
            sawEOF = true
            throw ExactReadError.incomplete(partial: got == 0 ? ByteView() : view, expected: count)
        }
        return view
    }

    /// Copies up to `max` staged bytes that follow the `skip` staged bytes to `dst`, consuming
    /// both; returns the bytes copied.
    func copyStaged(into dst: UnsafeMutableRawPointer, max: Int, after skip: Int) -> Int {
        staging.consume(skip)
        return copyStaged(into: dst, max: max)
    }

    /// Gives back the pages of `region` past `end` that no view can reference, when they are
    /// worth a syscall (at least 64 KiB and an eighth of what is used).
    func releaseTail(of region: Region, after end: Int) {
        let tail = region.capacity - Block.roundUpToPage(end)
        guard tail >= max(64 << 10, end / 8), region.resident > end else { return }
        region.decommit(end, region.capacity, pool: pool)
    }
}

extension Comparable {
    @inline(__always)
    func clamped(to range: ClosedRange<Self>) -> Self { min(max(self, range.lowerBound), range.upperBound) }
}
