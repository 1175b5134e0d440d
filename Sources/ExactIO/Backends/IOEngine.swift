import SystemPackage

/// What a backend does: fill a destination range from the descriptor.
///
/// Both engines have the same contract, so everything above them (staging, frames, errors)
/// is shared and behaves the same on io_uring and on `read(2)`.
protocol IOEngine: AnyObject {
    var kind: ExactReader.Backend { get }

    /// Whether a read would return at once (data, end of stream or an error): a zero-timeout
    /// poll. Used by `isAtEOF`, which must not block.
    func isReadableNow() -> Bool

    /// Reads into `dst` until at least `minimum` bytes arrived (`minimum <= dst.count`), the
    /// stream ended, or an error occurred. `slot` is the registered-buffer slot `dst` lies in,
    /// or -1. `exact` says the caller needs exactly `minimum` bytes and nothing more is wanted
    /// (a frame body going straight to its final memory).
    ///
    /// Returns the bytes read (fewer than `minimum` only at end of stream or with an error)
    /// and the error, if one ended the read. Bytes read before an error are valid and counted.
    /// EINTR is retried and EAGAIN waits for readiness inside the engine; neither is returned.
    func read(
        into dst: UnsafeMutableRawBufferPointer,
        atLeast minimum: Int,
        slot: Int32,
        exact: Bool,
        statistics: inout ExactReader.Statistics
    ) -> (count: Int, error: Errno?)
}
