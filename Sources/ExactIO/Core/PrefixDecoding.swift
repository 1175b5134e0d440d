// Decoding a length prefix, once for every path: the fast path scans the contiguous bytes in
// front of the stream in place; the slow path (`ReaderCore.decode`) scans the same way, over a
// copy of at most ten bytes when they lie across received segments. The over-long varint
// rule lives here and nowhere else.

/// What the bytes in front of a frame say about its length prefix.
enum PrefixScan: Equatable {
    /// The whole prefix: its value and width.
    case length(UInt64, width: Int)
    /// Not all of it yet: at least this many bytes are needed in all.
    case needMore(Int)
    /// A varint past 64 bits (its tenth byte above 1): refused. Its first ten bytes are the
    /// prefix's; `continues` when the tenth has the continuation bit (the prefix goes on).
    case overlong(continues: Bool)
}

/// Decodes a length prefix from the bytes in front of the stream.
protocol PrefixDecoder {
    func scan(_ bytes: UnsafeRawBufferPointer) -> PrefixScan
}

/// A fixed-width prefix: one definition for every width and byte order, specialised per width
/// where a caller names it (the frame loops name the common ones).
struct FixedWidthPrefix<T: FixedWidthInteger & UnsignedInteger>: PrefixDecoder {
    let bigEndian: Bool

    @inline(__always)
    func scan(_ bytes: UnsafeRawBufferPointer) -> PrefixScan {
        let width = MemoryLayout<T>.size
        guard bytes.count >= width else { return .needMore(width) }
        let raw = bytes.loadUnaligned(as: T.self)
        return .length(UInt64(bigEndian ? T(bigEndian: raw) : T(littleEndian: raw)), width: width)
    }
}

/// Unsigned LEB128 (protobuf's varint): 7 bits per byte, low groups first, at most 10 bytes
/// for 64 bits. A tenth byte above 1 (bits past 64, or more bytes to come) is over-long.
struct VarintPrefix: PrefixDecoder {
    @inline(__always)
    func scan(_ bytes: UnsafeRawBufferPointer) -> PrefixScan {
        var value: UInt64 = 0
        let n = min(bytes.count, 10)
        for i in 0..<n {
            let byte = bytes[i]
            if i == 9 && byte > 1 { return .overlong(continues: byte & 0x80 != 0) }
            value |= UInt64(byte & 0x7f) << UInt64(7 * i)
            if byte & 0x80 == 0 { return .length(value, width: i + 1) }
        }
        return .needMore(n + 1)
    }
}

/// Any prefix, chosen at run time.
struct AnyPrefix: PrefixDecoder {
    let prefix: LengthPrefix

    @inline(__always)
    func scan(_ bytes: UnsafeRawBufferPointer) -> PrefixScan {
        switch prefix {
        case .uint8: FixedWidthPrefix<UInt8>(bigEndian: true).scan(bytes)
        case .uint16(let e): FixedWidthPrefix<UInt16>(bigEndian: e == .bigEndian).scan(bytes)
        case .uint32(let e): FixedWidthPrefix<UInt32>(bigEndian: e == .bigEndian).scan(bytes)
        case .uint64(let e): FixedWidthPrefix<UInt64>(bigEndian: e == .bigEndian).scan(bytes)
        case .varint: VarintPrefix().scan(bytes)
        }
    }
}
