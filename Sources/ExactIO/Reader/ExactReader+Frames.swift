import SystemPackage

// Length-prefixed frames on the blocking reader: readFrame, and the borrowing withNextFrame
// and forEachFrame.

extension ExactReader {
    /// Reads one length-prefixed frame: the length, then exactly that many bytes.
    ///
    /// - Parameter prefix: The length encoding; default 4-byte big-endian.
    /// - Returns: The body as a read-only view, or nil when the stream ended cleanly before a
    ///   frame started.
    /// - Throws:
    ///   - `ExactReadError.frameTooLarge(length:limit:)` when the length exceeds
    ///     `options.maxFrameLength` (or a varint runs past 64 bits: `length` is then
    ///     `UInt64.max`): the whole prefix is consumed, no memory of that size is touched, the
    ///     body is left unread.
    ///   - `ExactReadError.incomplete(partial:expected:)` when the stream ends inside the
    ///     prefix (`partial` = the prefix bytes) or the body (`partial` = the body bytes,
    ///     `expected` = the length).
    ///   - `Errno` on a system failure (including `Errno.noMemory` when the body's memory
    ///     cannot be mapped, and `Errno.timedOut` when `Options.readTimeout` passes): the frame
    ///     is then not consumed at all (its prefix and whatever part of its body arrived stay
    ///     buffered, without being copied again), so a retry reads it whole.
    public func readFrame(prefix: LengthPrefix = .uint32(.bigEndian)) throws -> ByteView? {
        // The fast path (the whole frame is staged) stays small: the slow one is out of line.
        let staged = prefix == .uint32(.bigEndian)
            ? core.stagedFrame(FixedWidthPrefix<UInt32>(bigEndian: true)) : core.stagedFrame(AnyPrefix(prefix: prefix))
        if let view = staged { return view }
        return try readFrameSlowly(prefix)
    }

    @inline(never)
    func readFrameSlowly(_ prefix: LengthPrefix) throws -> ByteView? {
        try drive { core in try core.frame(prefix) }
    }

    // MARK: - Borrowing frames

    /// Reads the next length-prefixed frame and lends its body to `body` as a `RawSpan`,
    /// without a view, an allocation, a copy or any reference counting when the frame is
    /// already staged (the common case for small frames); otherwise the frame is read as
    /// `readFrame(prefix:)` reads it and lent from its memory.
    ///
    /// ```swift
    /// while let kind = try reader.withNextFrame(prefix: .varint, { frame in
    ///     frame.byteCount > 0 ? frame.unsafeLoad(as: UInt8.self) : 0   // look, keep nothing
    /// }) {
    ///     count[kind, default: 0] += 1
    /// }
    /// ```
    ///
    /// The span cannot outlive the call (the compiler checks it: `RawSpan` is non-escapable);
    /// to keep a frame, use `readFrame(prefix:)` or copy the bytes out. `body` may use the
    /// reader again: the frame's memory then stays where it is until `body` returns.
    ///
    /// - Parameters:
    ///   - prefix: The length encoding; default 4-byte big-endian.
    ///   - body: Called once with the frame's body.
    /// - Returns: What `body` returned, or nil when the stream ended cleanly before a frame
    ///   started (`body` is not called then).
    /// - Throws: What `readFrame(prefix:)` throws, with the same atomicity (an `Errno` leaves
    ///   the frame unconsumed, and `body` is not called); or what `body` throws, unchanged (the
    ///   frame is consumed then). `E` is `body`'s own error type: a closure that throws
    ///   `throws(MyError)` stays typed inside, and its errors reach the caller as they were
    ///   thrown (catch them with `catch let e as MyError`, or by pattern).
    public func withNextFrame<R, E: Error>(prefix: LengthPrefix = .uint32(.bigEndian), _ body: (RawSpan) throws(E) -> R) throws -> R? {
        if let bytes = core.takeStagedFrame(prefix) {
            return try lend(bytes) { p in try body(RawSpan(_unsafeBytes: p)) }
        }
        guard let view = try drive({ core in try core.frame(prefix) }) else { return nil }
        return try view.withUnsafeBytes { p in try body(RawSpan(_unsafeBytes: p)) }
    }

    /// Calls `body` with each frame of the stream in turn, as `withNextFrame(prefix:_:)` lends
    /// it, until the stream ends cleanly between frames.
    ///
    /// ```swift
    /// var bytes = 0
    /// try reader.forEachFrame { frame in bytes += frame.byteCount }
    /// ```
    ///
    /// - Returns: The number of frames `body` was called with.
    /// - Throws: What `withNextFrame(prefix:_:)` throws (`body`'s errors unchanged, of its own
    ///   type `E`); the frames before are consumed.
    @discardableResult
    public func forEachFrame<E: Error>(prefix: LengthPrefix = .uint32(.bigEndian), _ body: (RawSpan) throws(E) -> Void) throws -> Int {
        try forEachFrame(prefix: prefix) { (frame: RawSpan) throws -> Bool in
            try body(frame)
            return true
        }
    }

    /// Calls `body` with each frame of the stream in turn, as `withNextFrame(prefix:_:)` lends
    /// it, while `body` returns true and until the stream ends cleanly between frames.
    ///
    /// ```swift
    /// try reader.forEachFrame { frame in
    ///     handle(frame)
    ///     return !shuttingDown    // false stops after this frame; the rest stays unread
    /// }
    /// ```
    ///
    /// The closure must say it returns `Bool`: with a `return` statement (as above) or a
    /// signature (`{ (frame: RawSpan) -> Bool in … }`). A closure that is one expression and
    /// states nothing else is taken as the `Void` form (this overload is disfavoured, so that
    /// closures of every shape that return nothing never meet an ambiguity).
    ///
    /// - Returns: The number of frames `body` was called with (including the one that
    ///   returned false).
    /// - Throws: What `withNextFrame(prefix:_:)` throws (`body`'s errors unchanged, of its own
    ///   type `E`); the frames before are consumed.
    @_disfavoredOverload
    @discardableResult
    public func forEachFrame<E: Error>(prefix: LengthPrefix = .uint32(.bigEndian), _ body: (RawSpan) throws(E) -> Bool) throws -> Int {
        // One loop per common prefix, with the prefix a constant in it: the decoding is a load
        // and a byte swap, not a switch per frame.
        switch prefix {
        case .uint32(let e): return try frameLoop(prefix, FixedWidthPrefix<UInt32>(bigEndian: e == .bigEndian), body)
        case .varint: return try frameLoop(prefix, VarintPrefix(), body)
        default: return try frameLoop(prefix, AnyPrefix(prefix: prefix), body)
        }
    }

    private func frameLoop<D: PrefixDecoder>(_ prefix: LengthPrefix, _ decoder: D, _ body: (RawSpan) throws -> Bool) throws -> Int {
        var frames = 0
        while true {
            while let bytes = core.takeStagedFrame(decoder) {
                frames += 1
                guard try lend(bytes, { p in try body(RawSpan(_unsafeBytes: p)) }) else { return frames }
            }
            guard let view = try drive({ core in try core.frame(prefix) }) else { return frames }
            frames += 1
            guard try view.withUnsafeBytes({ p in try body(RawSpan(_unsafeBytes: p)) }) else { return frames }
        }
    }
}
