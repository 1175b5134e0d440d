import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage
import Testing
@testable import ExactIO

/// Reads one 256 MiB frame over a unix socket and checks the process's peak RSS growth.
/// Runs in its own process (an exit test), so the peak is this read's alone.
func peakMemoryChild(_ backend: ExactReader.Backend) throws {
    let n = 256 << 20
    let (a, b) = try socketPair(AF_UNIX)
    let chunk = pattern(1 << 20, seed: 77)  // the writer sends this 256 times: 1 MiB of its own
    let reader = try ExactReader(a, options: .init(backend: backend, maxFrameLength: 512 << 20))
    resetPeakRSS()
    let baseline = procStatus("VmRSS")
    let writer = Writer {
        defer { try? b.close() }
        var header = [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
        try header.withUnsafeMutableBytes { try writeAll(b, UnsafeRawBufferPointer($0)) }
        for _ in 0..<256 { try chunk.withUnsafeBytes { try writeAll(b, $0) } }
    }
    let f = try reader.readFrame()
    let peak = procStatus("VmHWM")
    writer.join()
    guard let f, f.count == n else { fatalError("frame missing") }
    for k in stride(from: 0, to: n, by: 1 << 20) where f[k] != chunk[0] || f[k + 4095] != chunk[4095] {
        fatalError("frame content wrong at \(k)")
    }
    let growth = Double(peak - baseline) / Double(n)
    FileHandle.standardError.write(
        "peak RSS growth for a 256 MiB frame (\(backend)): \(peak - baseline) bytes = \(String(format: "%.3f", growth)) n; statistics \(reader.statistics)\n"
            .data(using: .utf8)!)
    if growth > 1.1 { exit(3) }
}

/// Under RLIMIT_MEMLOCK = 64 KiB as an unprivileged user: io_uring stays, buffer registration
/// falls back, `fallbackReason` says why, frames arrive.
func smallMemlockChild() throws {
    becomeUnprivileged(memlock: 64 << 10)
    let (a, b) = try socketPair(AF_UNIX)
    let bodies = [pattern(10), pattern(1 << 20), pattern(300)]
    let wire = bodies.flatMap(frame)
    let writer = Writer {
        defer { try? b.close() }
        try wire.withUnsafeBytes { try writeAll(b, $0) }
    }
    let reader = try ExactReader(a)
    report("uid \(getuid()), memlock 64 KiB: backend \(reader.backend), fallbackReason: \(reader.fallbackReason ?? "nil")")
    guard reader.backend == .ioUring else { exit(4) }
    guard let why = reader.fallbackReason, why.contains("RLIMIT_MEMLOCK"), why.contains("process-wide") else { exit(5) }
    for body in bodies {
        guard try reader.readFrame().map(Array.init) == body else { exit(6) }
    }
    guard try reader.readFrame() == nil, reader.statistics.fixedReads == 0 else { exit(7) }
    writer.join()
    // A reader's own limit does not lift the process-wide budget.
    let (c, _) = try socketPair(AF_UNIX)
    let forced = try ExactReader(c, options: .init(registeredMemoryLimit: 1 << 30))
    report("with registeredMemoryLimit 1 GiB: \(forced.fallbackReason ?? "nil")")
    guard forced.backend == .ioUring, let w = forced.fallbackReason, w.contains("budget") else { exit(8) }
    endUnprivilegedChild()
}

@Suite struct MemoryTests {
    @Test func peakMemoryOfA256MiBFramePosix() async throws {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try peakMemoryChild(.posix)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test(.enabled(if: uringAvailable)) func peakMemoryOfA256MiBFrameURing() async throws {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try peakMemoryChild(.ioUring)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test(.enabled(if: uringAvailable)) func smallMemlockKeepsURingWithoutRegistration() async throws {
        printChild(await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try smallMemlockChild()
        })
    }
}

/// A 1 GiB body from a unix socket, forwarded to /dev/null (a file) or read in 4 MiB chunks:
/// the process's peak RSS grows by O(pipe + staging) or O(chunk), never O(body).
/// EXACTIO_TEST_LARGE_BODY_GIB=16 runs the same with 16 GiB (README "Files" figures).
func largeBodyChild(_ backend: ExactReader.Backend, chunked: Bool) throws {
    let n = (ProcessInfo.processInfo.environment["EXACTIO_TEST_LARGE_BODY_GIB"].flatMap { Int($0) } ?? 1) << 30
    let (a, b) = try socketPair(AF_UNIX)
    let chunk = pattern(1 << 20, seed: 78)
    let reader = try ExactReader(a, options: .init(backend: backend))
    let sink = try FileDescriptor.open("/dev/null", .writeOnly)
    resetPeakRSS()
    let baseline = procStatus("VmRSS")
    let writer = Writer {
        defer { try? b.close() }
        for _ in 0..<(n >> 20) { try chunk.withUnsafeBytes { try writeAll(b, $0) } }
        try [UInt8]([7, 7, 7]).withUnsafeBytes { try writeAll(b, $0) }
    }
    if chunked {
        var chunks = reader.chunks(of: n, maxChunk: 4 << 20)
        var k = 0
        while let c = try chunks.next() {
            guard c[0] == chunk[k % (1 << 20)] else { fatalError("chunk content wrong") }
            k += c.count
        }
        guard k == n else { fatalError("chunks covered \(k) bytes") }
    } else {
        guard try reader.forward(exactly: n, to: sink) == n else { fatalError("forward") }
    }
    guard try reader.readExactly(3) == ByteView([7, 7, 7]) else { fatalError("the stream after the body") }
    let peak = procStatus("VmHWM")
    writer.join()
    let limit = chunked ? 16 << 20 : 8 << 20
    FileHandle.standardError.write(
        "peak RSS growth, \(n >> 30) GiB body \(chunked ? "in 4 MiB chunks" : "forwarded") (\(backend)): \(peak - baseline) bytes (limit \(limit)); statistics \(reader.statistics)\n"
            .data(using: .utf8)!)
    if peak - baseline > limit { exit(3) }
}

@Suite struct LargeBodyMemoryTests {
    @Test func forwardPosix() async throws {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try largeBodyChild(.posix, chunked: false)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test(.enabled(if: uringAvailable)) func forwardURing() async throws {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try largeBodyChild(.ioUring, chunked: false)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test func chunksPosix() async throws {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try largeBodyChild(.posix, chunked: true)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test(.enabled(if: uringAvailable)) func chunksURing() async throws {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try largeBodyChild(.ioUring, chunked: true)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }
}
