import ExactIOCTestSupport
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

/// Under a seccomp filter that denies io_uring (Docker's default profile does): `.automatic`
/// falls back to POSIX and says why, `.ioUring` throws the errno, and every frame arrives.
func deniedURingChild() throws {
    guard ctest_deny_io_uring() == 0 else { fatalError("seccomp filter not installed") }
    let (a, b) = try socketPair(AF_UNIX)
    let bodies = [pattern(5), pattern(300_000), pattern(0), pattern(70_000)]
    let wire = bodies.flatMap(frame)
    let writer = Writer {
        defer { try? b.close() }
        try wire.withUnsafeBytes { try writeAll(b, $0) }
    }
    do {
        _ = try ExactReader(a, options: .init(backend: .ioUring))
        exit(10)  // must not succeed
    } catch let e as Errno where e == .notPermitted {
    }
    let reader = try ExactReader(a)
    FileHandle.standardError.write("seccomp-denied io_uring: backend \(reader.backend), fallbackReason: \(reader.fallbackReason ?? "nil")\n".data(using: .utf8)!)
    guard reader.backend == .posix else { exit(11) }
    guard let why = reader.fallbackReason, why.contains("io_uring_setup"), why.contains("errno 1") else { exit(12) }
    // The same, as values.
    guard reader.fallback?.step == .ringSetup, reader.fallback?.errno == .notPermitted else { exit(15) }
    for body in bodies {
        guard try reader.readFrame() == ByteView(body) else { exit(13) }
    }
    guard try reader.readFrame() == nil else { exit(14) }
    writer.join()
}

/// A SIGALRM every 100 µs during large and small reads: EINTR is retried, nothing is lost.
func signalStormChild(_ backend: ExactReader.Backend) throws {
    let (a, b) = try socketPair(AF_UNIX)
    let sizes = [16 << 20, 7, 1 << 20, 100, 16 << 20, 3, 65536]
    let bodies = sizes.enumerated().map { pattern($1, seed: UInt64($0)) }
    // Block SIGALRM in the writer thread so the reader's syscalls take the interrupts.
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGALRM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    let writer = Writer {
        defer { try? b.close() }
        for body in bodies {
            try frame(body).withUnsafeBytes { try writeAll(b, $0) }
            usleep(2000)  // let the reader block and be interrupted
        }
    }
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
    let reader = try ExactReader(a, options: .init(backend: backend))
    guard ctest_start_signal_storm(100) == 0 else { fatalError("timer") }
    var ok = true
    for body in bodies where try reader.readFrame() != ByteView(body) { ok = false }
    let end = try reader.readFrame()
    let signals = ctest_stop_signal_storm()
    writer.join()
    FileHandle.standardError.write("signal storm (\(backend)): \(signals) signals, \(reader.statistics.reads) reads\n".data(using: .utf8)!)
    guard ok, end == nil else { exit(20) }
    guard signals > 50 else { exit(21) }
}

@Suite struct HostileEnvironmentTests {
    @Test(.enabled(if: uringAvailable)) func deniedURingFallsBackToPosix() async {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try deniedURingChild()
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test func signalStormPosix() async {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try signalStormChild(.posix)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }

    @Test(.enabled(if: uringAvailable)) func signalStormURing() async {
        let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) {
            try signalStormChild(.ioUring)
        }
        if let result { print(String(decoding: result.standardErrorContent, as: UTF8.self)) }
    }
}
