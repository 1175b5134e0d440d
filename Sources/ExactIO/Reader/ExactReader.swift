#if os(Linux)
import CExactIOLinux
#endif
import Logging
import SystemPackage

// ExactReader: the blocking reader (a driver of ReaderCore), its reads, caller memory, and
// lending staged bytes in place.

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
    public var fallbackReason: String? { fallback?.description }
    /// `fallbackReason` as values: the step that failed and its errno (nil when io_uring runs
    /// with registered buffers).
    public var fallback: FallbackReason? {
        if let text = engine.degradation { return FallbackReason(step: .inheritedThroughFork, errno: nil, description: text) }
        return setupReason
    }
    /// Counters since creation.
    public var statistics: Statistics { core.statistics }

    let engine: any IOEngine
    let pool: MemoryPool
    let setupReason: FallbackReason?
    /// `S_IFMT` bits of the descriptor at creation (0 for a scripted reader).
    let fileType: mode_t
    #if os(Linux)
    /// The pipe `forward(exactly:to:)` splices through, once it was used.
    var forwardPipe: SplicePipe? = nil
    #endif
    /// The O_DIRECT engine, when the reader reads a file with O_DIRECT (`engine` is it then).
    let oDirectEngine: ODirectEngine?
    /// Whether the reader reads its file with `O_DIRECT` (from the device into its aligned,
    /// registered memory, bypassing the page cache).
    public var isDirectIO: Bool { oDirectEngine != nil }
    /// Why `O_DIRECT` was wanted (`Options.directIO`, or a descriptor opened with it) and is not
    /// used, e.g. "O_DIRECT not used: the filesystem does not support direct I/O …; reading
    /// through the page cache". Nil when it is used or was not wanted.
    public let directIOFallbackReason: String?
    // Unchecked exclusivity for the state every call touches: a reader has one owner at a time
    // (it is not Sendable), and no access to these overlaps another (no call hands out an
    // `inout` to them across a closure the caller supplies). Checked, they cost a runtime
    // access-set insertion per property per call: the biggest user-space cost per small frame.

    /// The I/O-free logic; this class is its blocking driver.
    @exclusivity(unchecked) var core: ReaderCore<StagingBuffer>
    /// The deadline of the call in progress (CLOCK_MONOTONIC ns), 0 for none.
    @exclusivity(unchecked) var deadline: Int64 = 0
    /// Consumed staging bytes lent in place to a caller's closure (`withExactly`,
    /// `withNextFrame`, `forEachFrame`) while it runs; nil otherwise. No view owns them, so
    /// nothing would stop a read from moving or releasing them: a call that may read while
    /// they are lent (the closure using the reader) first pins them (`pinLent`).
    @exclusivity(unchecked) var lent: UnsafeRawBufferPointer? = nil
    /// The owner that pins `lent`'s bytes, once a call made while they are lent took one.
    @exclusivity(unchecked) var lentOwner: AnyObject? = nil
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
        let fileType = setup.fileType
        self.fileType = fileType
        #if os(Linux)
        let wrapped = syscalls == nil
            ? ODirectEngine.wrap(setup.engine, fd: fd, fileType: fileType, options: options)
            : (engine: setup.engine, direct: nil, reason: nil)
        self.engine = wrapped.engine
        self.oDirectEngine = wrapped.direct
        self.directIOFallbackReason = wrapped.reason
        #else
        self.engine = setup.engine
        self.oDirectEngine = nil
        self.directIOFallbackReason = options.directIO ? "O_DIRECT not used: not supported on this platform" : nil
        #endif
        self.pool = setup.pool
        // The staging buffer is the first block: mapped (and registered) now, so that a
        // registration refusal is known and reported from the start.
        let staging = try StagingBuffer(pool: setup.pool, capacity: options.stagingCapacity)
        self.core = ReaderCore(
            buffer: staging, pool: setup.pool, maxFrameLength: options.maxFrameLength,
            largeReadThreshold: max(1, staging.nominalCapacity / 4),
            lengthAdjustment: options.lengthAdjustment, lengthIncludesPrefix: options.lengthIncludesPrefix)
        if let d = oDirectEngine {
            core.alignment = d.alignment
            core.phase = d.phase
        }
        var reason = setup.fallback
        if reason == nil, setup.pool.hasRegistrar, staging.region.slot < 0, let refusal = setup.pool.lastRefusal {
            reason = BackendSelection.reason(refusal, what: "the staging buffer", bytes: staging.nominalCapacity)
        }
        self.setupReason = reason
        if let logger = options.logger {
            logger.debug(
                "ExactIO reader created",
                metadata: [
                    "exactio.fd": "\(fd.rawValue)",
                    "exactio.backend": "\(engine.kind)",
                    "exactio.staging_bytes": "\(staging.nominalCapacity)",
                    "exactio.fallback": "\(reason.map { "\($0)" } ?? "none")",
                ])
        }
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
        core.buffer.retire()
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
        if core.buffer.buffered > 0 || core.pendingError != nil || core.brokenError != nil { return false }
        if core.sawEOF { return true }
        pinLent()
        switch engine.readiness() {
        case .notReadable:
            return false
        case .failed(let e):
            core.pendingError = e
            return false
        case .readable:
            deadline = 0
            do {
                try fill(atLeast: 1)
            } catch {
                core.pendingError = error
                return false
            }
            return core.sawEOF && core.buffer.buffered == 0
        }
    }

    /// Bytes read from the descriptor and not yet consumed.
    public var bufferedCount: Int { core.buffer.buffered }

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
        if count <= core.buffer.buffered { return try core.deliver(count) }
        return try readExactlySlowly(count)
    }

    @inline(never)
    func readExactlySlowly(_ count: Int) throws -> ByteView {
        try drive { core in try core.exactly(count) }
    }

    /// Fills all of `buffer` from the stream, writing straight into the caller's memory
    /// (after copying any bytes already staged). When `buffer` lies inside memory registered
    /// with `register(_:)`, io_uring reads it with READ_FIXED.
    ///
    /// - Throws: `ExactReadError.incomplete(partial:expected:)` when the stream ends first
    ///   (`partial` is a copy of the bytes that arrived, which are also at the start of
    ///   `buffer`); `Errno` on a system failure (the bytes read so far stay buffered in the
    ///   reader for the next read, and `buffer`'s content is then unspecified).
    ///
    /// - Important: After `Errno.notRecoverable` (`ENOTRECOVERABLE`: the io_uring ring failed
    ///   while a read into `buffer` was in flight and could not confirm that read had ended),
    ///   the kernel may still write into `buffer`, at any later time. Do not reuse, free or
    ///   unmap `buffer` for as long as the process lives: leak it on purpose (memory the reader
    ///   owns is quarantined the same way). The reader throws that error from then on.
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        let slot = registeredSlot(containing: base, count: buffer.count)
        try drive { core in try core.into(buffer, slot: slot) }
    }

    /// Reads exactly `count` bytes and lends them to `body` in place.
    ///
    /// - warning: The pointer is valid only inside `body`; do not escape it or write through
    ///   it. The bytes are consumed even when `body` throws.
    ///
    /// When the bytes are already staged and contiguous, `body` gets them where they are: no
    /// allocation, no copy, no reference counting. The same bytes as a `RawSpan`, whose
    /// lifetime the compiler checks: `withExactly(_:_:)` with a closure over `RawSpan`.
    ///
    /// - Throws: What `readExactly(_:)` throws (`body` is not called then), or what `body`
    ///   throws, unchanged (`E`: a closure's own error type passes through).
    public func withExactly<R, E: Error>(_ count: Int, _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws -> R {
        precondition(count >= 0, "withExactly: count must not be negative (got \(count))")
        if let bytes = core.takeStaged(count) { return try lend(bytes, body) }
        let view = try readExactly(count)
        return try view.withUnsafeBytes(body)
    }

    /// Reads between 1 and `maxCount` bytes: what is buffered, or else what one read brings.
    /// Returns an empty view only at end of stream (or when `maxCount` is 0).
    ///
    /// - Throws: `Errno` only (the end of the stream is an empty view, not an error):
    ///   `Errno.noMemory` when memory for the bytes cannot be mapped, `Errno.timedOut` when
    ///   `Options.readTimeout` passes, and the descriptor's failures. (Not declared
    ///   `throws(Errno)`: see docs/API-growth.md.)
    public func read(upTo maxCount: Int) throws -> ByteView {
        precondition(maxCount >= 0, "read(upTo:): maxCount must not be negative (got \(maxCount))")
        if maxCount == 0 { return ByteView() }
        if core.buffer.buffered > 0 { return try core.deliver(min(maxCount, core.buffer.buffered)) }
        return try drive { core in try core.upTo(maxCount) }
    }

    /// Reads and discards `count` bytes, using only the staging buffer's memory.
    ///
    /// - Throws: `ExactReadError.incomplete(partial:expected:)` with an empty `partial` and
    ///   `expected` = the bytes that could not be skipped, when the stream ends first; `Errno`
    ///   on a system failure (`statistics.bytesSkipped` tells how many were skipped by then).
    public func skip(_ count: Int) throws {
        precondition(count >= 0, "skip: count must not be negative (got \(count))")
        var left = count
        try drive { core in try core.skip(&left) }
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
        guard byteCount >= core.largeReadThreshold else { return }  // small reads use staging
        let physical = Int(clamping: sysconf(Int32(_SC_PHYS_PAGES))) &* Block.pageSize
        if physical > 0 && byteCount > physical { throw Errno.noMemory }
        let (needed, overflow) = byteCount.addingReportingOverflow(ReaderCore<StagingBuffer>.frontRoom)
        if overflow { throw Errno.noMemory }
        _ = try pool.residentRegion(atLeast: needed, register: true)  // released at once: pooled
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

    // MARK: - Lending staged bytes in place

    /// Calls `body` with consumed staging bytes in place (see `lent`). Restores the outer
    /// lending when nested (a body that calls `withExactly` again), pinning the outer bytes
    /// first.
    @inline(__always)
    func lend<R>(_ bytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if lent != nil { return try lendNested(bytes, body) }
        lent = bytes
        defer {
            lent = nil
            if lentOwner != nil { lentOwner = nil }
        }
        return try body(bytes)
    }

    func lendNested<R>(_ bytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        pinLent()
        let outer = (lent, lentOwner)
        lent = bytes
        lentOwner = nil
        defer { (lent, lentOwner) = outer }
        return try body(bytes)
    }

    /// Keeps the lent bytes where they are for as long as they are lent: from now on they have
    /// an owner, as a view's bytes do, so no read writes below them or lets their memory go.
    func pinLent() {
        guard let bytes = lent, lentOwner == nil else { return }
        lentOwner = core.buffer.pin(bytes)
    }

    // MARK: - The blocking driver

    /// Runs one core operation to its end: steps it, and serves each request it makes by
    /// reading from the descriptor (blocking until the engine returns), then steps again.
    @inline(__always)
    func drive<T>(_ step: (inout ReaderCore<StagingBuffer>) throws -> CoreStep<T>) throws -> T {
        if let e = core.brokenError { throw e }
        if lent != nil { pinLent() }
        let timeout = options.timeoutNanoseconds
        deadline = timeout > 0 ? monotonicNanoseconds() + timeout : 0
        do {
            while true {
                if let d = oDirectEngine { core.phase = d.phase }
                switch try step(&core) {
                case .done(let value):
                    return value
                case .need(.buffered(let count)):
                    try fill(atLeast: count)
                case .need(.largeRead(let dst, let minimum, let slot)):
                    if let logger = options.logger { Self.logLargeRead(logger, dst.count, minimum, slot) }
                    if let d = oDirectEngine {
                        d.overreadRoom = core.overreadRoom
                        core.overreadRoom = 0
                    }
                    let r = engineRead(into: dst, atLeast: minimum, slot: slot)
                    core.statistics.bytesCopied &+= r.copied
                    try core.largeReadCompleted(r, minimum: minimum)
                }
            }
        } catch {
            if let logger = options.logger { logFailure(logger, error) }
            throw error
        }
    }

    @inline(never)
    static func logLargeRead(_ logger: Logger, _ count: Int, _ minimum: Int, _ slot: Int32) {
        logger.trace(
            "ExactIO large read into the frame's memory",
            metadata: ["exactio.bytes": "\(count)", "exactio.minimum": "\(minimum)", "exactio.fixed": "\(slot >= 0)"])
    }

    /// Every error a call throws, at `debug`: what operators look for when a peer misbehaves.
    @inline(never)
    func logFailure(_ logger: Logger, _ error: any Error) {
        logger.debug(
            "ExactIO read failed",
            metadata: [
                "exactio.fd": "\(fileDescriptor.rawValue)",
                "exactio.error": "\(error)",
                "exactio.buffered_bytes": "\(core.buffer.buffered)",
            ])
    }

    /// Every read from the descriptor goes through here: a failure `isAtEOF` met comes first.
    func engineRead(into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32) -> EngineResult {
        if let e = core.pendingError {
            core.pendingError = nil
            return EngineResult(error: e)
        }
        return engine.read(into: dst, atLeast: minimum, slot: slot, offset: -1, deadline: deadline)
    }

    /// Makes `need` bytes buffered if the stream has them; at end of stream `core.sawEOF` is
    /// set with what did arrive still buffered.
    func fill(atLeast need: Int) throws(Errno) {
        if core.buffer.buffered >= need || core.sawEOF { return }
        let missing = need - core.buffer.buffered
        if let d = oDirectEngine { core.buffer.alignEmpty(phase: d.phase, alignment: d.alignment) }
        core.statistics.bytesCopied += try core.buffer.makeRoom(forAppending: missing)
        let tail = core.buffer.writable
        let ahead = min(tail.count, max(missing, core.readAhead))
        let r = engineRead(
            into: UnsafeMutableRawBufferPointer(rebasing: tail[0..<ahead]), atLeast: missing,
            slot: core.buffer.region.slot)
        if r.destinationPoisoned {
            // The kernel may still write into the staging buffer's free tail: never use it again.
            core.buffer.region.quarantine()
        }
        core.buffer.commit(r.count)
        core.statistics.bytesCopied &+= r.copied
        try core.filled(r, wanted: missing)
    }
}
