// How a frame's length is written in front of its body (the vocabulary of `readFrame` and its
// relatives); decoding it is Core/PrefixDecoding.swift's.

/// How a frame's body length is encoded before the body.
///
/// Before 1.0, minor versions may add encodings (other widths, for example). Pass the cases as
/// values (`.uint32(.bigEndian)`, `.varint`); a `switch` over a `LengthPrefix` should end with
/// `@unknown default:`, which compiles without a warning today and makes an added case a
/// warning rather than a broken build.
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
}
