import SystemPackage

// The engine protocol: what the blocking reader asks of a backend (fill a destination range),
// and what one call did (EngineResult).

/// What one engine call did: bytes, the error that ended it (if any), and what it cost.
struct EngineResult {
    /// Bytes read (valid data, also when `error` is set).
    var count = 0
    var error: Errno? = nil
    /// Read syscalls (POSIX) or read submissions (io_uring), and among them READ_FIXED ones.
    var reads = 0
    var fixedReads = 0
    /// Readiness waits (poll(2), or IORING_OP_POLL_ADD) after EAGAIN.
    var polls = 0
    /// The engine can no longer be used and the destination may still be written by the
    /// kernel (an io_uring request could not be cancelled): the memory must never be reused.
    var destinationPoisoned = false
    /// Bytes the engine copied in user space (O_DIRECT's bounce block for unaligned heads and
    /// tails), counted in `Statistics.bytesCopied`.
    var copied = 0
}

/// Whether a read would return at once.
enum Readiness: Equatable {
    case readable
    case notReadable
    /// The descriptor is unusable (POLLNVAL: EBADF) or poll itself failed.
    case failed(Errno)
}

/// What a backend does: fill a destination range from the descriptor.
///
/// Both engines have the same contract, so everything above them (staging, frames, errors)
/// is shared and behaves the same on io_uring and on `read(2)`. Engines return what they did;
/// they never touch the reader's state.
protocol IOEngine: AnyObject {
    var kind: ExactReader.Backend { get }

    /// Whether a read would return at once (data, end of stream or an error): a zero-timeout
    /// poll. Used by `isAtEOF`, which must not block.
    func readiness() -> Readiness

    /// Reads into `dst` until at least `minimum` bytes arrived (`minimum <= dst.count`), the
    /// stream ended, an error occurred, or `deadline` (CLOCK_MONOTONIC nanoseconds, 0 = none)
    /// passed (`Errno.timedOut`). `slot` is the registered-buffer slot `dst` lies in, or -1.
    /// `offset` is the file offset of `dst`'s first byte, or -1 for the current position.
    ///
    /// Returns fewer than `minimum` bytes only at end of stream or with an error. EINTR is
    /// retried and EAGAIN waits for readiness inside the engine; neither is returned.
    func read(
        into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32, offset: Int64, deadline: Int64
    ) -> EngineResult

    /// Why this engine no longer does what it was created for, if it does not (a child process
    /// reading through its parent's ring reads with `read(2)` instead).
    var degradation: String? { get }
}
