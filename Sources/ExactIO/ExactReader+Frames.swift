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
        try beginCall()
        guard let (length, width) = try peekLength(prefix) else { return nil }
        guard length <= UInt64(options.maxFrameLength) else {
            staging.consume(width)
            throw ExactReadError.frameTooLarge(length: length, limit: options.maxFrameLength)
        }
        let count = Int(length)
        if width + count <= staging.buffered {
            // The fast path: a view into staging, no allocation, no copy.
            staging.consume(width)
            return deliverStaged(count)
        }
        return try readBody(count, after: width)
    }

    /// Decodes a length prefix without consuming it: (length, prefix bytes), or nil at a clean
    /// end of stream. An over-long varint is consumed whole and refused.
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

    /// Unsigned LEB128, at most 10 bytes for 64 bits. A longer one (or a tenth byte with bits
    /// past 64) is refused with `frameTooLarge(length: UInt64.max, …)` after consuming the
    /// whole prefix, up to and including its last byte (the first without the continuation
    /// bit), or to the end of the stream: the stream is then at the body, as for any refused
    /// length. An `Errno` while looking for its end consumes nothing (for a prefix longer than
    /// the staging buffer, the part already skipped stays skipped).
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
                // Eleven bytes or more, or a tenth byte with bits past 64: find the end of the
                // prefix (its first byte without the continuation bit) and refuse it whole.
                try skipOverlongVarint(from: i)
                throw ExactReadError.frameTooLarge(length: .max, limit: options.maxFrameLength)
            }
            value |= UInt64(byte & 0x7f) << UInt64(7 * i)
            i += 1
            if byte & 0x80 == 0 { break }
        }
        return (value, i)
    }

    /// Consumes an over-long varint whose byte `i` is staged: through its last byte, or to the
    /// end of the stream. Scans staging without consuming while the prefix fits in it.
    private func skipOverlongVarint(from i: Int) throws {
        var k = i
        while true {
            if k >= staging.buffered {
                if k >= staging.nominalCapacity {
                    // Longer than staging: drop what was scanned, keep looking.
                    staging.consume(k)
                    k = 0
                }
                guard try fill(atLeast: k + 1) else {
                    staging.consume(staging.buffered)  // the stream ended inside the prefix
                    return
                }
            }
            if staging.readable[k] & 0x80 == 0 {
                staging.consume(k + 1)
                return
            }
            k += 1
        }
    }
}
