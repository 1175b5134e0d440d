// frame-inspect: reads length-prefixed frames from a file, a pipe, stdin or a socket address and
// prints the frame count, a size histogram, the throughput and CRC-32s. The smallest useful
// program on ExactIO's public API: copy it.
//
//   swift run exactio-frame-inspect [--prefix KIND] [--crc-each] SOURCE
//
//   SOURCE    a path (file or FIFO), `-` for stdin, `tcp:HOST:PORT` or `unix:PATH` to connect to
//   --prefix  u8, u16be, u16le, u32be (default), u32le, u64be, u64le, varint
//   --crc-each  print each frame's size and CRC-32 (IEEE), one line per frame (default: off)
//
// The reader has ExactReader's default options (backend automatic, 256 KiB staging, frames up
// to 64 MiB). A stream that ends inside a frame, or a frame over the limit, is an error (exit
// 2) that names the frame (1-based) and the byte offset where it starts.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import ExactIO
import SystemPackage

/// `SOCK_STREAM` as `socket(2)` takes it (Glibc imports it as an enum case, Darwin as a number).
#if canImport(Glibc)
let streamSocketType = Int32(SOCK_STREAM.rawValue)
#else
let streamSocketType = SOCK_STREAM
#endif

func fail(_ message: String) -> Never {
    let line = Array("frame-inspect: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(2)
}

let prefixes: [String: LengthPrefix] = [
    "u8": .uint8, "u16be": .uint16(.bigEndian), "u16le": .uint16(.littleEndian),
    "u32be": .uint32(.bigEndian), "u32le": .uint32(.littleEndian),
    "u64be": .uint64(.bigEndian), "u64le": .uint64(.littleEndian), "varint": .varint,
]

var prefix = LengthPrefix.uint32(.bigEndian)
var crcEach = false
var source: String? = nil
var args = CommandLine.arguments.dropFirst()
while let arg = args.popFirst() {
    switch arg {
    case "--prefix":
        guard let name = args.popFirst(), let p = prefixes[name] else {
            fail("--prefix needs one of \(prefixes.keys.sorted().joined(separator: ", "))")
        }
        prefix = p
    case "--crc-each": crcEach = true
    case "-h", "--help":
        let defaults = ExactReader.Options()
        print("""
            usage: exactio-frame-inspect [--prefix KIND] [--crc-each] SOURCE

            Reads length-prefixed frames from SOURCE to its end and prints the frame count, the bytes
            of all bodies, their CRC-32, the throughput, the backend and a histogram of frame sizes.

              SOURCE          a path (file or FIFO), - for stdin, tcp:HOST:PORT or unix:PATH (connects)
              --prefix KIND   the length prefix: u8, u16be, u16le, u32be, u32le, u64be, u64le, varint
                              (default: u32be, a 4-byte big-endian length)
              --crc-each      also print each frame's size and CRC-32 (IEEE), one line per frame
                              (default: off)
              -h, --help      this text

            Reader options are ExactReader's defaults: backend \(defaults.backend), staging \
            \(defaults.stagingCapacity >> 10) KiB, frames up to \(defaults.maxFrameLength >> 20) MiB.
            Exit status 0; 2 for a usage error or a stream that ends inside a frame (the error names
            the frame, counted from 1, and the byte offset where it starts) or a frame over the limit.
            """)
        exit(0)
    default:
        guard source == nil else { fail("unexpected argument \(arg)") }
        source = arg
    }
}
guard let source else { fail("no SOURCE (see --help)") }

/// CRC-32 (IEEE 802.3, as zlib's crc32), table-driven.
struct CRC32 {
    static let table: [UInt32] = (0..<256).map { i in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }
    var value: UInt32 = 0xFFFF_FFFF
    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        for b in bytes { value = Self.table[Int((value ^ UInt32(b)) & 0xff)] ^ (value >> 8) }
    }
    var final: UInt32 { value ^ 0xFFFF_FFFF }
}

/// Opens SOURCE: a path, stdin, or a connected stream socket.
func open(_ source: String) throws -> FileDescriptor {
    if source == "-" { return .standardInput }
    if source.hasPrefix("tcp:") {
        let parts = source.dropFirst(4).split(separator: ":")
        guard parts.count == 2, let port = UInt16(parts[1]) else { fail("tcp:HOST:PORT expected, got \(source)") }
        var hints = addrinfo()
        hints.ai_socktype = streamSocketType
        var list: UnsafeMutablePointer<addrinfo>? = nil
        guard getaddrinfo(String(parts[0]), String(port), &hints, &list) == 0, let ai = list else { fail("cannot resolve \(parts[0])") }
        defer { freeaddrinfo(list) }
        let fd = socket(ai.pointee.ai_family, streamSocketType, 0)
        guard fd >= 0, connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }
    if source.hasPrefix("unix:") {
        let path = Array(source.dropFirst(5).utf8)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        guard path.count < MemoryLayout.size(ofValue: addr.sun_path) else { fail("unix socket path too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in dst.copyBytes(from: path) }
        let fd = socket(AF_UNIX, streamSocketType, 0)
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard fd >= 0, ok == 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }
    return try FileDescriptor.open(source, .readOnly)
}

/// Bytes of the length prefix in front of a body of `count` bytes.
func prefixWidth(_ prefix: LengthPrefix, _ count: Int) -> Int {
    switch prefix {
    case .uint8: 1
    case .uint16: 2
    case .uint32: 4
    case .uint64: 8
    case .varint: max(1, (Int.bitWidth - count.leadingZeroBitCount + 6) / 7)
    }
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

do {
    let fd = try open(source)
    let reader = try ExactReader(fd)
    var histogram = [Int](repeating: 0, count: 65)  // bucket k: sizes in [2^(k-1), 2^k), 0 for empty
    var bytes = 0
    // Where the next frame starts in the stream, and how many frames were whole: what an error
    // names.
    var offset = 0
    var whole = 0
    var all = CRC32()
    let start = now()
    let frames: Int
    do {
        frames = try reader.forEachFrame(prefix: prefix) { frame in
            frame.withUnsafeBytes { body in
                whole += 1
                offset += prefixWidth(prefix, body.count) + body.count
                histogram[body.count == 0 ? 0 : Int.bitWidth - body.count.leadingZeroBitCount] += 1
                bytes += body.count
                all.update(body)
                if crcEach {
                    var one = CRC32()
                    one.update(body)
                    print("frame \(body.count) B crc32 \(String(one.final, radix: 16))")
                }
            }
        }
    } catch let error as ExactReadError {
        fail("frame \(whole + 1) at byte offset \(offset): \(error)")
    }
    let seconds = max(now() - start, 1e-9)
    print("frames: \(frames)")
    print("bytes: \(bytes) (bodies)")
    print("crc32 of all bodies: \(String(all.final, radix: 16))")
    let gbPerSecond = Double(bytes) / seconds / 1e9
    let framesPerSecond = Double(frames) / seconds
    print("throughput: \(gbPerSecond) GB/s, \(Int(framesPerSecond)) frames/s over \(seconds) s")
    print("backend: \(reader.backend)" + (reader.fallbackReason.map { " (\($0))" } ?? ""))
    print("sizes:")
    for (k, n) in histogram.enumerated() where n > 0 {
        let low = k == 0 ? "0" : String(UInt64(1) << UInt64(k - 1))
        let high = k == 0 ? "0" : (k == 64 ? "2^64" : String(UInt64(1) << UInt64(k)))
        print(k == 0 ? "  0 B: \(n)" : "  \(low)..<\(high) B: \(n)")
    }
} catch let error as ExactReadError {
    fail("\(error)")
} catch {
    fail("\(error)")
}
