// The errors of the reading logic itself (system failures are swift-system's Errno).

/// Errors of the reading logic itself. System failures are thrown as swift-system's `Errno`.
///
/// Catch the cases you handle by pattern (`catch ExactReadError.incomplete(let partial,
/// let expected)`), as the examples do.
///
/// ## Cases to come
///
/// Before 1.0, minor versions may add cases (a new limit a reader enforces, for example). End
/// a `switch` over an `ExactReadError` with `@unknown default:`: it compiles without a warning
/// today, and when a case is added the compiler warns about the new case instead of the build
/// failing. (A `catch` by pattern is unaffected.)
public enum ExactReadError: Error, Sendable, Equatable {
    /// The stream ended before `expected` bytes arrived. `partial` holds every byte that did
    /// arrive for this request, in order (for `readFrame`, the bytes of the body, or of the
    /// length prefix when the stream ended inside it; for `skip`, it is empty and `expected`
    /// is the number of bytes that could not be skipped). The reader is then at end of stream.
    case incomplete(partial: ByteView, expected: Int)

    /// A length prefix announced `length` bytes, more than `limit` (`Options.maxFrameLength`).
    /// With `Options.lengthAdjustment` or `Options.lengthIncludesPrefix` set, `length` is the
    /// body length after them (`UInt64.max` if that passes 64 bits).
    /// A varint that runs past 64 bits (more than 10 bytes, or a tenth byte above 1) is
    /// reported with `length` = `UInt64.max`, the largest length a prefix can express (a
    /// 10-byte varint of exactly `UInt64.max` is reported the same way: both are beyond any
    /// limit). Thrown after the whole prefix was consumed and before any memory for the body
    /// was touched: the body is left unread, so the caller can `skip` it or close the
    /// connection.
    case frameTooLarge(length: UInt64, limit: Int)

    /// A length prefix announced `length`, which `Options.lengthAdjustment` and
    /// `Options.lengthIncludesPrefix` turn into `bodyLength` < 0 bytes (for example a length of
    /// 2 in a 4-byte prefix that counts itself). Thrown after the whole prefix was consumed;
    /// where the next frame starts is unknown, so the stream cannot be resynchronized: close it.
    case invalidLength(length: UInt64, bodyLength: Int)
}

extension ExactReadError: CustomStringConvertible {
    public var description: String {
        switch self {
        case .incomplete(let partial, let expected):
            "stream ended after \(partial.count) of \(expected) bytes"
        case .frameTooLarge(let length, let limit):
            length == .max
                ? "length prefix of 2^64 - 1 bytes or more (a varint past 64 bits) exceeds the limit of \(limit) bytes"
                : "frame of \(length) bytes exceeds the limit of \(limit) bytes"
        case .invalidLength(let length, let bodyLength):
            "length prefix \(length) gives a body of \(bodyLength) bytes with the framing options (lengthAdjustment, lengthIncludesPrefix)"
        }
    }
}
