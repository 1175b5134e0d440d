// The scoped form of a loop: created for a closure, shut down when it ends.

extension IOLoop {
    /// Runs `body` with a new loop, and shuts the loop down when `body` returns or throws (also
    /// when the task is cancelled): the scoped form of `init(options:)` plus `shutdown()`.
    ///
    /// ```swift
    /// let frames = try await IOLoop.withLoop { loop in
    ///     let reader = try AsyncExactReader(socket, loop: loop)
    ///     var count = 0
    ///     for try await _ in reader.frames() { count += 1 }
    ///     return count
    /// }
    /// ```
    ///
    /// Readers of the loop that outlive the scope fail from then on (`Errno.canceled`), as
    /// after `shutdown()`.
    ///
    /// - Parameters:
    ///   - options: The loop's options.
    ///   - isolation: The actor `body` runs on: the caller's, by default.
    ///   - body: Runs with the loop; what it returns is returned.
    /// - Throws: What `init(options:)` throws, or what `body` throws (after the shutdown).
    public static func withLoop<Result>(
        options: Options = Options(),
        isolation: isolated (any Actor)? = #isolation,
        _ body: (IOLoop) async throws -> Result
    ) async throws -> Result {
        let loop = try IOLoop(options: options)
        let result: Result
        do {
            result = try await body(loop)
        } catch {
            await loop.shutdown()
            throw error
        }
        await loop.shutdown()
        return result
    }
}
