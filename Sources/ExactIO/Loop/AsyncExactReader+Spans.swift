import SystemPackage

// The span form of the async reader's withExactly, as on ExactReader (withNextFrame and
// forEachFrame lend spans already). No OutputSpan forms of readExactly(into:): the standard
// library hands out an `inout OutputSpan` only inside synchronous closures, such as
// `Array(capacity:initializingWith:)`, where no read can be awaited.

extension AsyncExactReader {
    /// Reads exactly `count` bytes and lends them to `body` as a `RawSpan`; as
    /// `ExactReader.withExactly(_:_:)` with a span (the same overload rules: a closure that
    /// does not state its parameter's type gets the pointer form when both would do). When the
    /// bytes are already received and contiguous, the span is over them where they are.
    ///
    /// - Throws: What `readExactly(_:)` throws (`body` is not called then), or what `body`
    ///   throws, unchanged.
    @_disfavoredOverload
    nonisolated(nonsending) public func withExactly<R, E: Error>(_ count: Int, _ body: (RawSpan) throws(E) -> R) async throws -> R {
        try await withExactly(count) { (bytes: UnsafeRawBufferPointer) throws(E) -> R in
            try body(RawSpan(_unsafeBytes: bytes))
        }
    }
}
