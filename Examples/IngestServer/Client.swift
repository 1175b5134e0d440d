import ExactIO
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// The client that drives the server, and the check of what the server stored. Frame bodies are
// self-describing: connection, sequence number and length in a 12-byte header, then a pattern
// that depends on all three, so `verify` can tell a frame that is missing, doubled, cut or
// altered.

struct Workload {
    var connections: Int
    var frames: Int
    var maxSize: Int

    init(_ arguments: Arguments) throws {
        connections = try arguments.int("connections", 8)
        frames = try arguments.int("frames", 1000)
        maxSize = max(16, try arguments.int("max-size", 65536))
    }

    /// The body of frame `sequence` of connection `connection`.
    func body(connection: Int, sequence: Int) -> [UInt8] {
        var state = UInt64(connection) &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(sequence) &* 0xBF58_476D_1CE4_E5B9 | 1
        state ^= state >> 31
        let size = 16 + Int(state % UInt64(maxSize - 15))
        var bytes = [UInt8](repeating: 0, count: size)
        for (i, v) in [UInt32(connection), UInt32(sequence), UInt32(size)].enumerated() {
            withUnsafeBytes(of: v.bigEndian) { bytes.replaceSubrange(i * 4..<i * 4 + 4, with: $0) }
        }
        for i in 12..<size { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ connection &* 7 &+ sequence) }
        return bytes
    }
}

func runClient(_ arguments: Arguments) async throws {
    let host = arguments.string("host", "127.0.0.1")
    guard let portValue = arguments.options["port"], let port = UInt16(portValue) else {
        throw UsageError("client wants --port")
    }
    let work = try Workload(arguments)
    let window = max(1, try arguments.int("window", 16))
    let badPeers = arguments.flags.contains("bad-peers")
    // Frames acknowledged per connection, written to --record (also when the run fails, as it
    // does when the server is stopped mid-run) for `verify --acked`.
    let acks = AckCounts(work.connections)
    defer {
        if let record = arguments.options["record"] {
            let lines = acks.counts.withLock { $0.map(String.init).joined(separator: "\n") }
            if let fd = try? FileDescriptor.open(record, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite) {
                _ = try? fd.closeAfter { try fd.writeAll((lines + "\n").utf8) }
            }
        }
    }

    try await IOLoop.withLoop { loop in
        try await withThrowingTaskGroup(of: Void.self) { group in
            if badPeers {
                group.addTask { try await attack(host: host, port: port) }
            }
            for c in 0..<work.connections {
                group.addTask {
                    let fd = try connect(host: host, port: port)
                    try await loop.withConnection(fd) { reader, writer in
                        var acked: UInt64 = 0
                        func expectAck() async throws {
                            let ack = try await reader.readExactly(8)
                            let count = ack.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) }
                            acked += 1
                            guard count == acked else { throw ClientError("connection \(c): ack \(count), expected \(acked)") }
                            acks.counts.withLock { $0[c] = Int(acked) }
                        }
                        for s in 0..<work.frames {
                            if s >= window { try await expectAck() }
                            let body = work.body(connection: c, sequence: s)
                            try await writer.write(copying: withUnsafeBytes(of: UInt32(body.count).bigEndian) { Array($0) } + body)
                        }
                        while acked < UInt64(work.frames) { try await expectAck() }
                        try await writer.finish()
                    }
                }
            }
            try await group.waitForAll()
        }
    }
    say("client: \(work.connections * work.frames) frames sent and acknowledged")
}

/// Bad peers, one after another: an oversized length prefix, a reset in the middle of a frame,
/// and random bytes. Each must end its own connection (the server closes it) and nothing else.
func attack(host: String, port: UInt16) async throws {
    // A length of 4 GiB - 1: refused before any memory of that size is touched.
    var fd = try connect(host: host, port: port)
    try sendAll(fd, [0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3])
    try expectClosedByServer(fd)
    try fd.close()

    // Half a frame, then a reset (SO_LINGER 0): the server loses the partial frame, nothing else.
    fd = try connect(host: host, port: port)
    try sendAll(fd, [0, 0, 0x10, 0] + [UInt8](repeating: 0xAB, count: 1000))
    var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
    _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
    try fd.close()

    // Garbage: random lengths and bytes, then an early close.
    fd = try connect(host: host, port: port)
    var rng = SystemRandomNumberGenerator()
    try sendAll(fd, (0..<4096).map { _ in UInt8.random(in: 0...255, using: &rng) })
    try fd.close()
    say("client: bad peers sent (oversized length, reset mid-frame, garbage)")
}

/// Waits for the server to close `fd` (end of stream or reset) after refusing what it sent.
func expectClosedByServer(_ fd: FileDescriptor) throws {
    var byte: UInt8 = 0
    while true {
        let n = read(fd.rawValue, &byte, 1)
        if n == 0 { return }
        if n < 0 {
            if errno == EINTR { continue }
            if errno == ECONNRESET { return }
            throw Errno(rawValue: errno)
        }
        throw ClientError("the server answered a frame with an oversized length")
    }
}

/// Checks that `FILE` holds every frame of the workload exactly once, intact.
func verify(_ arguments: Arguments) throws {
    guard let path = arguments.positional.first else { throw UsageError("verify wants a FILE") }
    let work = try Workload(arguments)
    var seen = [Bool](repeating: false, count: work.connections * work.frames)
    let fd = try FileDescriptor.open(path, .readOnly)
    defer { try? fd.close() }
    let reader = try ExactReader(fd)
    var count = 0
    while let frame = try reader.readFrame() {
        count += 1
        guard frame.count >= 12 else { throw ClientError("frame \(count): \(frame.count) bytes, shorter than its header") }
        let (c, s) = frame.withUnsafeBytes {
            (Int(UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self))),
             Int(UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self))))
        }
        guard c < work.connections, s < work.frames else { throw ClientError("frame \(count): connection \(c), sequence \(s): not sent") }
        guard frame.elementsEqual(work.body(connection: c, sequence: s)) else {
            throw ClientError("frame \(count): connection \(c), sequence \(s): bytes differ")
        }
        guard !seen[c * work.frames + s] else { throw ClientError("frame \(count): connection \(c), sequence \(s): stored twice") }
        seen[c * work.frames + s] = true
    }
    if let record = arguments.options["acked"] {
        // A run that was stopped: every acknowledged frame must be stored (a frame sent but not
        // acknowledged may or may not be).
        let recordFD = try FileDescriptor.open(record, .readOnly)
        let text = try recordFD.closeAfter { () throws -> String in
            let fd = recordFD
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = try chunk.withUnsafeMutableBytes { try fd.read(into: $0) }
                if n == 0 { break }
                bytes += chunk[..<n]
            }
            return String(decoding: bytes, as: UTF8.self)
        }
        let acked = text.split(separator: "\n").compactMap { Int($0) }
        var total = 0
        for (c, n) in acked.enumerated() where c < work.connections {
            total += n
            if let missing = (0..<min(n, work.frames)).first(where: { !seen[c * work.frames + $0] }) {
                throw ClientError("connection \(c), sequence \(missing): acknowledged but not stored")
            }
        }
        say("verify: \(count) frames stored once and intact, all \(total) acknowledged ones among them")
        return
    }
    if let missing = seen.firstIndex(of: false) {
        throw ClientError("connection \(missing / work.frames), sequence \(missing % work.frames): missing (\(count) frames stored)")
    }
    say("verify: \(count) frames, each stored once and intact")
}

/// Frames acknowledged so far, per connection.
final class AckCounts: Sendable {
    let counts: Mutex<[Int]>
    init(_ connections: Int) { counts = Mutex([Int](repeating: 0, count: connections)) }
}

struct ClientError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A connected TCP socket (blocking, close-on-exec).
func connect(host: String, port: UInt16) throws -> FileDescriptor {
    let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard s >= 0 else { throw Errno(rawValue: errno) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
        close(s)
        throw UsageError("--host \(host) is not an IPv4 address")
    }
    let r = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard r == 0 else {
        let e = errno
        close(s)
        throw Errno(rawValue: e)
    }
    return FileDescriptor(rawValue: s)
}

func sendAll(_ fd: FileDescriptor, _ bytes: [UInt8]) throws {
    var sent = 0
    while sent < bytes.count {
        let n = bytes.withUnsafeBytes { send(fd.rawValue, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
        if n < 0 {
            if errno == EINTR { continue }
            throw Errno(rawValue: errno)
        }
        sent += n
    }
}
