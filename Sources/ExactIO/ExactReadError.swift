/// Errors of the reading logic itself. System failures are thrown as swift-system's `Errno`.
public enum ExactReadError: Error, Sendable, Equatable {
    /// The stream ended before `expected` bytes arrived. `partial` holds every byte that did
    /// arrive for this request, in order (for `readFrame`, the bytes of the body, or of the
    /// length prefix when the stream ended inside it; for `skip`, it is empty and `expected`
    /// is the number of bytes that could not be skipped). The reader is then at end of stream.
    case incomplete(partial: ByteView, expected: Int)

    /// A length prefix announced `length` bytes, more than `limit` (`Options.maxFrameLength`),
    /// or a length that does not fit in `Int`, or a varint longer than 64 bits
    /// (`length` is then `UInt64.max`). Thrown after the prefix was consumed and before any
    /// memory for the body was touched: the body is left unread, so the caller can `skip` it
    /// or close the connection.
    case frameTooLarge(length: UInt64, limit: Int)
}

extension ExactReadError: CustomStringConvertible {
    public var description: String {
        switch self {
        case .incomplete(let partial, let expected):
            "stream ended after \(partial.count) of \(expected) bytes"
        case .frameTooLarge(let length, let limit):
            length == .max
                ? "length prefix overflows 64 bits (limit \(limit) bytes)"
                : "frame of \(length) bytes exceeds the limit of \(limit) bytes"
        }
    }
}
