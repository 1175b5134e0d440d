import SystemPackage

/// How a frame's body length is encoded before the body.
public enum LengthPrefix: Sendable, Hashable {
    /// Byte order of a fixed-width length.
    public enum Endianness: Sendable, Hashable {
        case bigEndian
        case littleEndian
    }

    /// One byte.
    case uint8
    /// Two bytes.
    case uint16(Endianness)
    /// Four bytes (the default prefix is `.uint32(.bigEndian)`).
    case uint32(Endianness)
    /// Eight bytes.
    case uint64(Endianness)
    /// Unsigned LEB128 (protobuf's varint): 7 bits per byte, low groups first, at most 10
    /// bytes for 64 bits.
    case varint

    /// Bytes of a fixed-width prefix; nil for `.varint`.
    var width: Int? {
        switch self {
        case .uint8: 1
        case .uint16: 2
        case .uint32: 4
        case .uint64: 8
        case .varint: nil
        }
    }

    var endianness: Endianness {
        switch self {
        case .uint16(let e), .uint32(let e), .uint64(let e): e
        case .uint8, .varint: .bigEndian
        }
    }
}

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
        try drive { core in try core.frame(prefix) }
    }
}
