import SystemPackage

// AsyncExactReader: the reader core driven by the event loop; what it asks of the loop and how
// it waits (its half of LoopConnection's shared state).

/// The async counterpart of `ExactReader`: exactly n bytes, or length-prefixed frames, from a
/// socket or pipe served by an `IOLoop`, with the same errors (plus `CancellationError`) and the
/// same memory and copy contract.
///
/// What it has, each as on `ExactReader` (`async`): `readFrame(prefix:)`, `readExactly(_:)`,
/// `readExactly(into:)` (a pointer), `withExactly(_:_:)` (a pointer or a `RawSpan`),
/// `withNextFrame(prefix:_:)` and `forEachFrame(prefix:_:)` (frames lent as a `RawSpan` in
/// place; the closures are synchronous: a span is never lent across an `await`),
/// `read(upTo:)`, `skip(_:)`, `isAtEOF`, `bufferedCount`, `statistics`; and of its own,
/// `frames(prefix:)`. What only `ExactReader` has: the span forms of `readExactly(into:)`,
/// positional and file reads (`readExactly(_:at:)`, `chunks(of:maxChunk:)`, O_DIRECT),
/// `forward(exactly:to:)`, memory calls (`reserve`, `releaseCachedMemory`,
/// `register`/`unregister`) and the backend and fallback properties (a loop's are the loop's:
/// `IOLoop.backend`). Replies go out through an `AsyncExactWriter` on the same connection
/// (`IOLoop.withConnection(_:_:)`).
///
/// ```swift
/// let reader = try AsyncExactReader(conn, loop: loop)
/// while let frame = try await reader.readFrame() { handle(frame) }
/// // or: for try await frame in reader.frames() { handle(frame) }
/// ```
///
/// How bytes travel: the loop receives into its shared receive buffers (an idle connection
/// holds none); a frame that lies inside one received buffer is a view of it (no copy), one that
/// spans two is copied once into memory of its own (`statistics.bytesCopied`), and a large
/// body (a quarter of `Options.stagingCapacity` or more, 64 KiB by default) goes straight into
/// its own memory after the bytes already received.
///
/// A reader has one owner at a time: it is not `Sendable`, so the compiler stops two tasks from
/// using it at once. Cancelling the task that awaits a read ends the read with
/// `CancellationError` and cancels its request in the kernel; the stream stays consistent (bytes
/// that arrived stay buffered, `readFrame` consumes nothing), so a later read continues exactly
/// where the stream is. `Options.readTimeout` works as for `ExactReader` (`Errno.timedOut`).
/// After the loop's `shutdown()`, reads fail with `Errno.canceled`.
public final class AsyncExactReader {
    /// The descriptor read from (borrowed: never closed by the reader).
    public let fileDescriptor: FileDescriptor
    /// The loop that serves the reader.
    public let loop: IOLoop
    /// The options the reader was created with.
    public let options: ExactReader.Options
    /// Counters since creation.
    public var statistics: ExactReader.Statistics { core.statistics }

    // Unchecked exclusivity, as in `ExactReader`: one owner at a time (not Sendable), and no
    // access overlaps another (each core step is synchronous; awaits happen between steps).
    @exclusivity(unchecked) var core: ReaderCore<SegmentBuffer>
    let connection: LoopConnection
    /// `statistics.bytesCopied` when the reader last took what the loop received.
    @exclusivity(unchecked) private var copiedAtLastLook = 0
    /// The deadline of the call in progress (CLOCK_MONOTONIC ns), 0 for none.
    @exclusivity(unchecked) private var deadline: Int64 = 0
    private var contacted = false

    /// Creates a reader over `fd` on `loop` (the descriptor is borrowed, never closed).
    ///
    /// - Parameters:
    ///   - fd: A stream socket or a pipe/FIFO, blocking or not. Regular files are refused
    ///     (`Errno.notSupported`): read them with `ExactReader`.
    ///   - loop: The loop that serves it.
    ///   - options: Honoured: staging capacity (which sets the large-read threshold), frame
    ///     limit, read timeout, the framing options (`lengthAdjustment`,
    ///     `lengthIncludesPrefix`), `registeredMemoryLimit` (the loop's readers register no
    ///     memory: every limit holds), and `logger` (the reader's creation, at `debug`).
    ///     Refused rather than ignored: a `backend` other than `.automatic` or the loop's
    ///     own, `directIO`, and a `queueDepth` other than the default (both are for files).
    /// - Throws: `InvalidOptionError` (a value out of range, or a refused field); `Errno` as for
    ///   `ExactReader.init` (a datagram socket is `Errno.protocolWrongTypeForSocket`);
    ///   `Errno.canceled` when the loop was shut down.
    public convenience init(_ fd: FileDescriptor, loop: IOLoop, options: ExactReader.Options = ExactReader.Options()) throws {
        try self.init(fd, loop: loop, options: options, sender: nil)
    }

    /// A reader whose connection has a send side too (`sender`: the writer's, for
    /// `IOLoop.withConnection`; nil: a reader alone).
    init(_ fd: FileDescriptor, loop: IOLoop, options: ExactReader.Options, sender: LoopSender?) throws {
        try options.validate()
        try options.validate(forReaderOn: loop)
        let type = try BackendSelection.fileType(fd)
        if type == S_IFSOCK { try BackendSelection.requireStreamSocket(fd) }
        if type == S_IFREG || type == S_IFDIR { throw Errno.notSupported }
        if loop.isStopped { throw Errno.canceled }
        self.fileDescriptor = fd
        self.loop = loop
        self.options = options
        self.connection = LoopConnection(
            fd: try OwnedDescriptor(duplicating: fd), loop: loop, isSocket: type == S_IFSOCK,
            maxBuffered: loop.options.maxBufferedBytesPerConnection, sender: sender)
        let capacity = try Block.roundedCapacity(options.stagingCapacity)
        self.core = ReaderCore(
            buffer: SegmentBuffer(nominalCapacity: capacity), pool: loop.framePool,
            maxFrameLength: options.maxFrameLength, largeReadThreshold: max(1, capacity / 4),
            lengthAdjustment: options.lengthAdjustment, lengthIncludesPrefix: options.lengthIncludesPrefix)
        options.logger?.debug(
            "ExactIO async reader created",
            metadata: ["exactio.fd": "\(fd.rawValue)", "exactio.staging_bytes": "\(capacity)"])
    }

    deinit {
        if let sender = connection.sender {
            // Shared with a writer: the loop closes the descriptor when both are gone.
            sender.leave()
            loop.send(.detach(connection))
        } else if contacted {
            loop.send(.detach(connection))  // the loop closes its descriptor when it is done
        } else {
            connection.fd.close()
        }
    }

    /// True when the stream has ended and every byte of it was consumed, as far as the loop has
    /// seen (never waits; starts receiving if nothing is buffered).
    public var isAtEOF: Bool {
        absorb()
        return core.buffer.buffered == 0 && core.sawEOF && core.pendingError == nil
    }

    /// Bytes received and not yet consumed by the reader.
    public var bufferedCount: Int {
        absorb()
        return core.buffer.buffered
    }

    // MARK: - Reading

    /// Reads one length-prefixed frame; as `ExactReader.readFrame(prefix:)`, plus
    /// `CancellationError` when the awaiting task is cancelled (the frame is then not consumed).
    nonisolated(nonsending) public func readFrame(prefix: LengthPrefix = .uint32(.bigEndian)) async throws -> ByteView? {
        // The whole frame is received: a view of it, no wait (the default prefix decoded by a
        // loop specialised for it).
        let staged = prefix == .uint32(.bigEndian)
            ? core.stagedFrame(FixedWidthPrefix<UInt32>(bigEndian: true)) : core.stagedFrame(AnyPrefix(prefix: prefix))
        if let view = staged { return view }
        return try await drive { core in try core.frame(prefix) }
    }

    /// Reads exactly `count` bytes; as `ExactReader.readExactly(_:)`.
    nonisolated(nonsending) public func readExactly(_ count: Int) async throws -> ByteView {
        precondition(count >= 0, "readExactly: count must not be negative (got \(count))")
        return try await drive { core in try core.exactly(count) }
    }

    /// Fills all of `buffer`; as `ExactReader.readExactly(into:)`. The memory must stay valid
    /// until the call returns (also when the task is cancelled: the call returns only when the
    /// kernel is done with it).
    nonisolated(nonsending) public func readExactly(into buffer: UnsafeMutableRawBufferPointer) async throws {
        guard buffer.count > 0, buffer.baseAddress != nil else { return }
        try await drive { core in try core.into(buffer, slot: -1) }
    }

    /// Reads exactly `count` bytes and lends them to `body` in place; as
    /// `ExactReader.withExactly(_:_:)`: when they are already received and contiguous, `body`
    /// gets them where they are (no view, no allocation, no reference counting); otherwise they
    /// are read as `readExactly(_:)` reads them. `body`'s own error type `E` passes through
    /// unchanged.
    ///
    /// - warning: The pointer is valid only inside `body`; do not escape it or write through
    ///   it. The bytes are consumed even when `body` throws.
    nonisolated(nonsending) public func withExactly<R, E: Error>(_ count: Int, _ body: (UnsafeRawBufferPointer) throws(E) -> R) async throws -> R {
        precondition(count >= 0, "withExactly: count must not be negative (got \(count))")
        if count <= core.buffer.buffered {
            // Safety: `owner` keeps the received memory (a receive buffer is given back to the
            // kernel when its last holder goes) until `body` returns.
            let owner = core.buffer.firstOwner
            if let bytes = core.takeStaged(count) { return try withExtendedLifetime(owner) { try body(bytes) } }
        }
        let view = try await readExactly(count)
        return try view.withUnsafeBytes(body)
    }

    // MARK: - Borrowing frames

    /// Reads the next length-prefixed frame and lends its body to `body` as a `RawSpan`; as
    /// `ExactReader.withNextFrame(prefix:_:)`: when the frame is already received in one piece
    /// (the common case for small frames), no view, allocation, copy or reference counting. A
    /// received frame whose body spans two receive buffers is lent from one copy of the body
    /// (`statistics.bytesCopied`): on the stack up to 1 KiB, in memory of its own above.
    ///
    /// - Returns: What `body` returned, or nil at a clean end of stream before a frame.
    /// - Throws: What `readFrame(prefix:)` throws (the frame is then not consumed, and `body`
    ///   is not called), or what `body` throws, unchanged (the frame is consumed). `E` is
    ///   `body`'s own error type, as for `ExactReader.withNextFrame(prefix:_:)`.
    nonisolated(nonsending) public func withNextFrame<R, E: Error>(
        prefix: LengthPrefix = .uint32(.bigEndian), _ body: (RawSpan) throws(E) -> R
    ) async throws -> R? {
        if let lent = try lendStagedFrame(AnyPrefix(prefix: prefix), body) { return lent.value }
        guard let view = try await readFrame(prefix: prefix) else { return nil }
        return try view.withUnsafeBytes { p in try body(RawSpan(_unsafeBytes: p)) }
    }

    /// Calls `body` with each frame of the stream in turn, as `withNextFrame(prefix:_:)` lends
    /// it, until the stream ends cleanly between frames: every frame already received is lent
    /// in place, one after the other, before the reader waits again.
    ///
    /// - Returns: The number of frames `body` was called with.
    /// - Throws: What `withNextFrame(prefix:_:)` throws (`body`'s errors unchanged, of its own
    ///   type `E`); the frames before are consumed.
    @discardableResult
    nonisolated(nonsending) public func forEachFrame<E: Error>(
        prefix: LengthPrefix = .uint32(.bigEndian), _ body: (RawSpan) throws(E) -> Void
    ) async throws -> Int {
        try await forEachFrame(prefix: prefix) { (frame: RawSpan) throws -> Bool in
            try body(frame)
            return true
        }
    }

    /// `forEachFrame(prefix:_:)` while `body` returns true: false stops after that frame (the
    /// rest stays unread). As for `ExactReader`, the closure must say it returns `Bool`.
    @_disfavoredOverload
    @discardableResult
    nonisolated(nonsending) public func forEachFrame<E: Error>(
        prefix: LengthPrefix = .uint32(.bigEndian), _ body: (RawSpan) throws(E) -> Bool
    ) async throws -> Int {
        switch prefix {
        case .uint32(let e): return try await frameLoop(prefix, FixedWidthPrefix<UInt32>(bigEndian: e == .bigEndian), body)
        case .varint: return try await frameLoop(prefix, VarintPrefix(), body)
        default: return try await frameLoop(prefix, AnyPrefix(prefix: prefix), body)
        }
    }

    /// Generic over the decoder only, not over `body`'s error type: a loop generic in `E` is
    /// not specialized (the public entry points are generic in it), and paid a metadata lookup
    /// and a witness call per frame (256 × 64 B frames on the loop: 2× the user CPU).
    nonisolated(nonsending) private func frameLoop<D: PrefixDecoder>(
        _ prefix: LengthPrefix, _ decoder: D, _ body: (RawSpan) throws -> Bool
    ) async throws -> Int {
        var frames = 0
        while true {
            while let lent = try lendStagedFrame(decoder, body) {
                frames += 1
                if !lent.value { return frames }
            }
            guard let view = try await readFrame(prefix: prefix) else { return frames }
            frames += 1
            if !(try view.withUnsafeBytes { p in try body(RawSpan(_unsafeBytes: p)) }) { return frames }
        }
    }

    /// The next frame lent in place when it is received in one piece: `body`'s result (boxed,
    /// so that an optional result is not mistaken for "no frame"), or nil.
    @inline(__always)
    private func lendStagedFrame<D: PrefixDecoder, R>(_ decoder: D, _ body: (RawSpan) throws -> R) rethrows -> Lent<R>? {
        guard core.buffer.buffered > 0, core.brokenError == nil else { return nil }
        // Safety: `owner` keeps the frame's received memory (a receive buffer goes back to the
        // kernel when its last holder goes) until `body` returns; the bytes are consumed.
        let owner = core.buffer.firstOwner
        guard let bytes = core.takeStagedFrame(decoder) else { return try lendSplitFrame(decoder, body) }
        return Lent(value: try withExtendedLifetime(owner) { try body(RawSpan(_unsafeBytes: bytes)) })
    }

    /// Bodies up to this size that span receive buffers are lent from a copy on the stack
    /// (Swift's temporary allocations are on the stack up to 1 KiB; above it they would be a
    /// heap allocation, as `readFrame`'s copy is).
    static let gatherLimit = 1024

    /// The next frame lent when it is received whole but not in one run (the fast path above
    /// declined): a body in one receive buffer after a prefix that spans two is lent in place;
    /// a body that spans buffers, of at most `gatherLimit` bytes, is copied once to the stack
    /// and lent from there (no allocation). Nil otherwise (`readFrame` decides).
    private func lendSplitFrame<D: PrefixDecoder, R>(_ decoder: D, _ body: (RawSpan) throws -> R) rethrows -> Lent<R>? {
        guard let (width, count) = core.bufferedFrameBounds(decoder) else { return nil }
        if core.buffer.run(at: width) >= count {
            core.takeBufferedPrefix(width)
            // Safety: as in `lendStagedFrame`, the body's receive buffer is held until `body`
            // returns (its owner is the first segment's once the prefix is consumed).
            let owner = core.buffer.firstOwner
            let bytes = core.takeStaged(count).unsafelyUnwrapped  // in one run: checked above
            return Lent(value: try withExtendedLifetime(owner) { try body(RawSpan(_unsafeBytes: bytes)) })
        }
        guard count <= Self.gatherLimit else { return nil }
        return try withUnsafeTemporaryAllocation(byteCount: max(count, 1), alignment: 16) { scratch in
            // Safety: `scratch` has room for `count` bytes and lives until `body` returns.
            core.takeBufferedPrefix(width)
            core.copyBufferedBody(count, into: scratch.baseAddress.unsafelyUnwrapped)
            return Lent(value: try body(RawSpan(_unsafeBytes: UnsafeRawBufferPointer(rebasing: scratch[0..<count]))))
        }
    }

    private struct Lent<T> {
        let value: T
    }

    /// Reads between 1 and `maxCount` bytes; as `ExactReader.read(upTo:)`.
    nonisolated(nonsending) public func read(upTo maxCount: Int) async throws -> ByteView {
        precondition(maxCount >= 0, "read(upTo:): maxCount must not be negative (got \(maxCount))")
        if maxCount == 0 { return ByteView() }
        return try await drive { core in try core.upTo(maxCount) }
    }

    /// Reads and discards `count` bytes; as `ExactReader.skip(_:)`.
    nonisolated(nonsending) public func skip(_ count: Int) async throws {
        precondition(count >= 0, "skip: count must not be negative (got \(count))")
        var left = count
        try await drive { core in try core.skip(&left) }
    }

    /// The frames of the stream, as an `AsyncSequence` that ends at a clean end of stream
    /// between frames (and throws what `readFrame` throws otherwise).
    public func frames(prefix: LengthPrefix = .uint32(.bigEndian)) -> Frames {
        Frames(reader: self, prefix: prefix)
    }

    /// The frames of a reader (`AsyncExactReader.frames(prefix:)`).
    public struct Frames: AsyncSequence {
        /// Each frame's body, as a read-only view.
        public typealias Element = ByteView
        let reader: AsyncExactReader
        let prefix: LengthPrefix

        /// The iterator that reads the next frame each time it is asked.
        public func makeAsyncIterator() -> Iterator {
            Iterator(reader: reader, prefix: prefix)
        }

        /// Reads frames one by one with `readFrame(prefix:)`.
        public struct Iterator: AsyncIteratorProtocol {
            let reader: AsyncExactReader
            let prefix: LengthPrefix

            /// The next frame, nil at a clean end of stream; throws as `readFrame(prefix:)` does.
            nonisolated(nonsending) public mutating func next() async throws -> ByteView? {
                try await reader.readFrame(prefix: prefix)
            }
        }
    }

    // MARK: - The async driver

    /// Runs one core operation to its end, serving its requests from the loop: received
    /// segments for `.buffered`, a read in the loop for `.direct`.
    nonisolated(nonsending) private func drive<T>(_ step: (inout ReaderCore<SegmentBuffer>) throws -> CoreStep<T>) async throws -> T {
        if let e = core.brokenError { throw e }
        // The deadline is taken when the call first has to wait (no clock read for a frame that
        // is already buffered).
        deadline = 0
        defer {
            // The call is over: its deadline, and a timeout the loop flagged for it, go with it.
            if deadline > 0 {
                connection.state.withLock { s in
                    s.deadline = 0
                    s.timedOut = false
                }
            }
        }
        while true {
            switch try step(&core) {
            case .done(let value):
                return value
            case .need(.buffered(let count)):
                try await receive(atLeast: count)
            case .need(.largeRead(let dst, let minimum, let slot)):
                try await largeRead(dst, minimum: minimum, slot: slot)
            }
        }
    }

    /// Takes what the loop received (without waiting), and asks it to receive when it does not.
    /// An error the loop met is kept in `core.pendingError`, after the bytes that came before it.
    @discardableResult
    private func absorb(arm armIfIdle: Bool = true) -> (timedOut: Bool, shutDown: Bool) {
        // While an error waits to be thrown, nothing more is received (the end of stream that
        // follows a reset must not overtake the reset).
        let errorWaiting = core.pendingError != nil
        let wanted = core.readAhead
        // Frames that straddled receive buffers were copied since the last look: this
        // connection's frames would rather lie in memory of its own (the loop's adaptive
        // receive).
        let straddled = core.statistics.bytesCopied - copiedAtLastLook >= LoopConnection.straddleCopies
        copiedAtLastLook = core.statistics.bytesCopied
        let (segments, copied, eof, error, timedOut, shutDown, arm) = connection.state.withLock { s in
            s.wanted = wanted
            if straddled { s.framesStraddle = true }
            let segments = s.received.takeAll()
            let copied = s.copied
            s.copied = 0
            let error = s.error
            s.error = nil
            let timedOut = s.timedOut
            s.timedOut = false
            let arm = armIfIdle && !s.receiving && !s.eof && error == nil && !s.shutDown && !errorWaiting
            if arm { s.receiving = true }
            return (segments, copied, s.eof, error, timedOut, s.shutDown, arm)
        }
        if !segments.isEmpty {
            core.statistics.reads += segments.count
            core.statistics.bytesCopied += copied + core.buffer.appendAll(segments)
        }
        if eof { core.sawEOF = true }
        if let error { core.pendingError = error }
        if arm {
            contacted = true
            loop.send(.receive(connection))
        }
        return (timedOut, shutDown)
    }

    /// The error the loop met, once the bytes before it are consumed.
    private func takePendingError() -> Errno? {
        let e = core.pendingError
        core.pendingError = nil
        return e
    }

    /// Starts the call's deadline clock, if it has a timeout.
    private func startDeadline() {
        let timeout = options.timeoutNanoseconds
        if timeout > 0 && deadline == 0 { deadline = monotonicNanoseconds() + timeout }
    }

    nonisolated(nonsending) private func receive(atLeast count: Int) async throws {
        startDeadline()
        var watching = false
        while true {
            let (timedOut, shutDown) = absorb()
            if core.buffer.buffered >= count || core.sawEOF { return }
            if let error = takePendingError() { throw error }
            if shutDown { throw Errno.canceled }
            if timedOut { throw Errno.timedOut }
            try Task.checkCancellation()
            if deadline > 0 {
                if monotonicNanoseconds() >= deadline { throw Errno.timedOut }
                if !watching {
                    connection.state.withLock { $0.deadline = deadline }
                    loop.send(.deadline(connection))
                    watching = true
                }
            }
            if loop.pool.isLow {
                // Waiting with part of a frame: let the shared receive buffers go back.
                core.statistics.bytesCopied += (try? core.buffer.detachFromReceiveBuffers()) ?? 0
            }
            await connection.wait(cancellable: true)
        }
    }

    /// A large body straight into its own memory: the loop reads it (`LoopMachine`).
    nonisolated(nonsending) private func largeRead(_ dst: UnsafeMutableRawBufferPointer, minimum: Int, slot: Int32) async throws {
        startDeadline()
        // Bytes received before the read come first: the core copies them in when it steps.
        // Not arming a receive: the body goes to its own memory (a receive now would only be
        // ended again for the read, and take the body's first bytes through a buffer).
        let (_, shutDown) = absorb(arm: false)
        if core.buffer.buffered > 0 { return }
        if let error = takePendingError() { return try core.largeReadCompleted(EngineResult(error: error), minimum: minimum) }
        if core.sawEOF { return try core.largeReadCompleted(EngineResult(), minimum: minimum) }
        if shutDown { return try core.largeReadInterrupted(count: 0, Errno.canceled) }
        if Task.isCancelled { return try core.largeReadInterrupted(count: 0, CancellationError()) }
        connection.state.withLock { s in
            s.largeRead = LargeReadRequest(dst: dst, minimum: minimum, slot: slot)
            s.deadline = deadline
        }
        contacted = true
        loop.send(.largeRead(connection))
        if deadline > 0 { loop.send(.deadline(connection)) }
        var cancelSent = false
        while true {
            // Once the cancellation is asked for, wait (uncancellably) for the kernel to let go
            // of the memory.
            await connection.wait(cancellable: !cancelSent, largeRead: true)
            let (done, interrupted) = connection.state.withLock { s in
                (s.largeRead?.done ?? true, s.shutDown || s.timedOut)
            }
            if done { break }
            if !cancelSent && (Task.isCancelled || interrupted) {
                loop.send(.cancelLargeRead(connection))
                cancelSent = true
            }
        }
        let (d, timedOut, shutDown2) = connection.state.withLock { s in
            let d = s.largeRead
            s.largeRead = nil
            let t = s.timedOut
            s.timedOut = false
            return (d, t, s.shutDown)
        }
        guard let d else { return }
        if d.retry { return }  // bytes arrived before the read started: the core takes them first
        if timedOut { return try core.largeReadInterrupted(count: d.got, Errno.timedOut) }
        if shutDown2 && (d.error == .canceled || d.error == nil && d.got < minimum) {
            return try core.largeReadInterrupted(count: d.got, Errno.canceled)
        }
        if cancelSent && (d.error == .canceled || d.got < minimum) {
            return try core.largeReadInterrupted(count: d.got, CancellationError())
        }
        try core.largeReadCompleted(EngineResult(count: d.got, error: d.error, reads: 1, destinationPoisoned: d.poisoned), minimum: minimum)
    }
}
