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
    ///     `options.maxFrameLength` (or `Int`, or 64 bits for a varint): the prefix is
    ///     consumed, no memory of that size is touched, the body is left unread.
    ///   - `ExactReadError.incomplete(partial:expected:)` when the stream ends inside the
    ///     prefix (`partial` = the prefix bytes) or the body (`partial` = the body bytes,
    ///     `expected` = the length).
    ///   - `Errno` on a system failure: the frame is then not consumed at all (its prefix and
    ///     whatever part of its body arrived stay buffered), so a retry reads it whole.
    public func readFrame(prefix: LengthPrefix = .uint32(.bigEndian)) throws -> ByteView? {
        guard let (length, width) = try peekLength(prefix) else { return nil }
        let header = Array(staging.readable.prefix(width))
        staging.consume(width)
        guard length <= UInt64(options.maxFrameLength) else {
            throw ExactReadError.frameTooLarge(length: length, limit: options.maxFrameLength)
        }
        do {
            return try readExactly(Int(length))
        } catch let error as Errno {
            // A failed frame is not half-consumed: the prefix goes back in front of whatever
            // part of the body arrived, so a retry reads the same frame.
            statistics.bytesCopied += staging.unconsume(header)
            throw error
        }
    }

    /// Decodes a length prefix without consuming it: (length, prefix bytes), or nil at a clean
    /// end of stream.
    func peekLength(_ prefix: LengthPrefix) throws -> (UInt64, Int)? {
        guard let width = prefix.width else { return try peekVarint() }
        guard try fill(atLeast: width) else {
            if staging.buffered == 0 { return nil }
            throw ExactReadError.incomplete(partial: deliverStaged(staging.buffered), expected: width)
        }
        var value: UInt64 = 0
        let bytes = staging.readable
        switch prefix.endianness {
        case .bigEndian:
            for i in 0..<width { value = value << 8 | UInt64(bytes[i]) }
        case .littleEndian:
            for i in (0..<width).reversed() { value = value << 8 | UInt64(bytes[i]) }
        }
        return (value, width)
    }

    func peekVarint() throws -> (UInt64, Int)? {
        var value: UInt64 = 0
        var i = 0
        while true {
            guard try fill(atLeast: i + 1) else {
                if staging.buffered == 0 { return nil }
                throw ExactReadError.incomplete(partial: deliverStaged(staging.buffered), expected: i + 1)
            }
            let byte = staging.readable[i]
            if i == 9 && byte > 1 {
                // Eleven bytes or more, or a tenth byte with bits past 64: refuse now.
                staging.consume(i + 1)
                throw ExactReadError.frameTooLarge(length: .max, limit: options.maxFrameLength)
            }
            value |= UInt64(byte & 0x7f) << UInt64(7 * i)
            i += 1
            if byte & 0x80 == 0 { break }
        }
        return (value, i)
    }
}
