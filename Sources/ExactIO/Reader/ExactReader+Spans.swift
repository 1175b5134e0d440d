import SystemPackage

// The span forms of the blocking reader's borrowing and filling calls: withExactly lending a
// RawSpan, readExactly(into:) filling an OutputRawSpan or OutputSpan<UInt8> (SE-0485).

extension ExactReader {
    /// Reads exactly `count` bytes and lends them to `body` as a `RawSpan`, in place: the span
    /// form of `withExactly(_:_:)` (the pointer form), as `withNextFrame(prefix:_:)` lends a
    /// frame.
    ///
    /// ```swift
    /// let kind = try reader.withExactly(8) { (header: RawSpan) in
    ///     header.unsafeLoad(fromByteOffset: 4, as: UInt32.self)
    /// }
    /// ```
    ///
    /// When the bytes are already staged and contiguous, `body` gets them where they are: no
    /// allocation, no copy, no reference counting. The span cannot outlive the call (the
    /// compiler checks it: `RawSpan` is non-escapable). The bytes are consumed even when
    /// `body` throws.
    ///
    /// A closure that does not state its parameter's type is given the pointer form when both
    /// would do (this overload is disfavoured, so that closures written for the pointer form
    /// keep their meaning): say `(bytes: RawSpan)` to lend a span, or use a member only
    /// `RawSpan` has (`byteCount`, `unsafeLoad`).
    ///
    /// - Throws: What `readExactly(_:)` throws (`body` is not called then), or what `body`
    ///   throws, unchanged (`E`: a closure's own error type passes through).
    @_disfavoredOverload
    public func withExactly<R, E: Error>(_ count: Int, _ body: (RawSpan) throws(E) -> R) throws -> R {
        precondition(count >= 0, "withExactly: count must not be negative (got \(count))")
        if let bytes = core.takeStaged(count) {
            return try lend(bytes) { p in try body(RawSpan(_unsafeBytes: p)) }
        }
        let view = try readExactly(count)
        return try view.withUnsafeBytes { p in try body(RawSpan(_unsafeBytes: p)) }
    }

    /// Fills the free capacity of `output` from the stream (`output.freeCapacity` bytes, after
    /// the bytes it already holds), writing straight into its memory as
    /// `readExactly(into:)` does for a pointer: the bytes already staged are copied, the rest
    /// is read there by the kernel.
    ///
    /// - Throws: `ExactReadError.incomplete(partial:expected:)` when the stream ends first: the
    ///   bytes that arrived are appended to `output` (and copied into `partial`); `Errno` on a
    ///   system failure: nothing is appended (the bytes read so far stay buffered in the reader
    ///   for the next read; the free capacity's content is unspecified).
    ///
    /// - Important: After `Errno.notRecoverable`, the kernel may still write into the free
    ///   capacity, as for `readExactly(into:)` with a pointer: do not reuse or free that
    ///   memory for as long as the process lives.
    public func readExactly(into output: inout OutputRawSpan) throws {
        if output.isFull { return }
        try output.withUnsafeMutableBytes { (buffer, initialized) throws in
            let free = UnsafeMutableRawBufferPointer(rebasing: buffer[initialized...])
            do {
                try readExactly(into: free)
                initialized = buffer.count
            } catch ExactReadError.incomplete(let partial, let expected) {
                initialized += partial.count
                throw ExactReadError.incomplete(partial: partial, expected: expected)
            }
        }
    }

    /// Fills the free capacity of `output` from the stream, as
    /// `readExactly(into:)` fills an `OutputRawSpan`: the way to read `n` bytes into a new
    /// array without initializing its memory first.
    ///
    /// ```swift
    /// let record = try [UInt8](capacity: 4096) { try reader.readExactly(into: &$0) }
    /// ```
    ///
    /// - Throws: As `readExactly(into:)` with an `OutputRawSpan`: on
    ///   `ExactReadError.incomplete(partial:expected:)` the bytes that arrived are appended;
    ///   on an `Errno`, nothing is.
    public func readExactly(into output: inout OutputSpan<UInt8>) throws {
        if output.isFull { return }
        try output.withUnsafeMutableBufferPointer { (buffer, initialized) throws in
            let free = UnsafeMutableRawBufferPointer(UnsafeMutableBufferPointer(rebasing: buffer[initialized...]))
            do {
                try readExactly(into: free)
                initialized = buffer.count
            } catch ExactReadError.incomplete(let partial, let expected) {
                initialized += partial.count
                throw ExactReadError.incomplete(partial: partial, expected: expected)
            }
        }
    }
}
