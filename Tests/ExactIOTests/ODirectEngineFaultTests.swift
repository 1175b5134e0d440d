#if canImport(Glibc)
import Glibc
#endif
import SystemPackage
import Testing
@testable import ExactIO

/// `ODirectEngine` over a scripted engine: what an error between its block reads does
/// (issue 16, item 12: a failed tail read was taken for the end of the file, so the next read
/// returned a silent end of stream where the file goes on).
@Suite struct ODirectEngineFaultTests {
    /// A "file" in memory read at explicit offsets (as `ODirectEngine` reads), failing the
    /// requests `fail` picks with its errno, once each.
    final class ScriptedFile: IOEngine {
        let bytes: [UInt8]
        var fail: (_ offset: Int64, _ count: Int) -> Errno?
        private(set) var requests: [(offset: Int64, count: Int, failed: Bool)] = []

        init(_ bytes: [UInt8], fail: @escaping (_ offset: Int64, _ count: Int) -> Errno?) {
            self.bytes = bytes
            self.fail = fail
        }

        var kind: ExactReader.Backend { .posix }
        var degradation: String? { nil }
        func readiness() -> Readiness { .readable }

        func read(
            into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32, offset: Int64, deadline: Int64
        ) -> EngineResult {
            precondition(offset >= 0, "ODirectEngine reads at explicit offsets")
            if let e = fail(offset, dst.count) {
                requests.append((offset, dst.count, true))
                return EngineResult(count: 0, error: e, reads: 1)
            }
            requests.append((offset, dst.count, false))
            let n = max(0, min(dst.count, bytes.count - Int(offset)))
            if n > 0 {
                bytes.withUnsafeBytes { dst.baseAddress!.copyMemory(from: $0.baseAddress! + Int(offset), byteCount: n) }
            }
            return EngineResult(count: n, reads: 1)
        }
    }

    /// Block-aligned memory of `count` bytes (O_DIRECT's rule; `ODirectEngine` reads whole
    /// blocks straight into memory in phase with the file offset).
    static func aligned(_ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: aligned_alloc(4096, (count + 4095) / 4096 * 4096), count: count)
    }

    /// Three whole blocks and a 100-byte tail. The frame's blocks go straight to its memory; the
    /// tail read (through the one-block bounce buffer) fails once with EIO. The error is
    /// reported with the 12,288 bytes that arrived, and the next read gets the tail: the file
    /// did not end there.
    @Test func aFailedTailReadIsAnErrorNotTheEndOfTheFile() throws {
        let a = 4096
        let file = pattern(3 * a + 100, seed: 41)
        var failures = 0
        let inner = ScriptedFile(file) { offset, count in
            // The tail's block, once.
            if offset == Int64(3 * a) && failures == 0 {
                failures += 1
                return .ioError
            }
            return nil
        }
        let engine = try ODirectEngine(inner: inner, fd: FileDescriptor(rawValue: -1), alignment: a, start: 0)
        let dst = Self.aligned(file.count)
        defer { dst.deallocate() }
        let first = engine.read(into: dst, atLeast: dst.count, slot: -1, offset: -1, deadline: 0)
        #expect(first.error == .ioError)
        #expect(first.count == 3 * a, "the whole blocks that arrived are counted")
        #expect(failures == 1, "the tail's read was the one that failed: \(inner.requests)")
        // The caller retries the rest (ReaderCore keeps the bytes that arrived and throws; the
        // next call asks again).
        let rest = UnsafeMutableRawBufferPointer(rebasing: dst[first.count...])
        let second = engine.read(into: rest, atLeast: rest.count, slot: -1, offset: -1, deadline: 0)
        #expect(second.error == nil)
        #expect(second.count == 100, "the tail after the failed read: \(second.count) bytes (0: a silent end of file)")
        let same = Array(dst) == file
        #expect(same, "the bytes are the file's")
        // Then the real end of the file.
        let past = Self.aligned(10)
        defer { past.deallocate() }
        let end = engine.read(into: past, atLeast: 1, slot: -1, offset: -1, deadline: 0)
        #expect(end.count == 0 && end.error == nil, "the end of the file")
    }

    /// The same with a frame out of phase with the file (every block through the bounce
    /// buffer): a failure of any of its reads leaves the rest of the file readable.
    @Test(arguments: [1, 2, 3])
    func aFailedBounceReadAtAnyBlockIsAnError(failingBlock: Int) throws {
        let a = 4096
        let file = pattern(3 * a + 100, seed: 42)
        var failures = 0
        let inner = ScriptedFile(file) { offset, _ in
            if offset == Int64(failingBlock * a) && failures == 0 {
                failures += 1
                return .ioError
            }
            return nil
        }
        // Starting at byte 1: the first block is read at creation and its bytes from 1 on are
        // kept; every later read lands out of phase (memory aligned, file offset not).
        let engine = try ODirectEngine(inner: inner, fd: FileDescriptor(rawValue: -1), alignment: a, start: 1)
        let out = Self.aligned(file.count - 1)
        defer { out.deallocate() }
        var got = 0
        var errors = 0
        var attempts = 0
        while got < out.count && attempts < 20 {
            attempts += 1
            let r = engine.read(
                into: UnsafeMutableRawBufferPointer(rebasing: out[got...]), atLeast: out.count - got, slot: -1,
                offset: -1, deadline: 0)
            got += r.count
            if r.error != nil {
                errors += 1
            } else if r.count == 0 {
                break  // an end of file
            }
        }
        #expect(errors == 1, "the failure was reported")
        #expect(got == out.count, "read \(got) of \(out.count) bytes: the failure did not end the file")
        let same = Array(out) == Array(file[1...])  // a Bool: a failing array comparison prints 12 KB
        #expect(same, "the bytes are the file's from byte 1")
    }

    /// The first block's read at creation (a start inside a block, or the probe) fails: the
    /// engine is not created, and its bounce block is freed once (the initializer freed it and
    /// then the deinitializer, which Swift runs for a class initializer that throws after every
    /// stored property is set, freed it again: a double free, on the path `wrap` takes for a
    /// filesystem that refuses aligned reads).
    @Test(arguments: [Int64(1), 0])
    func aFailedFirstReadIsThrownFromTheInitializer(start: Int64) throws {
        let file = pattern(3 * 4096, seed: 43)
        for _ in 0..<100 {
            let inner = ScriptedFile(file) { offset, _ in offset == 0 ? .invalidArgument : nil }
            #expect(throws: Errno.invalidArgument) {
                _ = try ODirectEngine(inner: inner, fd: FileDescriptor(rawValue: -1), alignment: 4096, start: start, probe: true)
            }
            // Memory the allocator hands out next must be intact (a double free corrupts it).
            let probe = [UInt8](repeating: 7, count: 4096)
            #expect(probe.allSatisfy { $0 == 7 })
        }
    }
}
