import SystemPackage

// The span form of the async reader's borrowing call, as on ExactReader. (No OutputSpan
// forms: the standard library hands out an `inout OutputSpan` only inside synchronous
// closures, such as `Array(capacity:initializingWith:)`, where no read can be awaited.)

extension AsyncExactReader {
    /// Reads exactly `count` bytes and lends them to `body` as a `RawSpan`; as
    /// `ExactReader.withExactly(_:_:)` with a span (the same overload rules: a closure that
    /// does not state its parameter's type gets the pointer form when both would do).
    ///
    /// - Throws: What `readExactly(_:)` throws (`body` is not called then), or what `body`
    ///   throws, unchanged.
    @_disfavoredOverload
    public func withExactly<R, E: Error>(_ count: Int, _ body: (RawSpan) throws(E) -> R) async throws -> R {
        let view = try await readExactly(count)
        return try view.withUnsafeBytes { p in try body(RawSpan(_unsafeBytes: p)) }
    }
}
