#if canImport(Glibc)
import Glibc
#endif
import ExactIOCTestSupport
import Foundation
import SystemPackage
import Testing
@testable import ExactIO

/// O_DIRECT files: aligned reads into registered memory, frames at any offset, the file's
/// partial last block, tmpfs, and reads in flight completing out of order.
@Suite struct DirectIOTests {
    /// A file on the disk-backed filesystem of /var/tmp (tmpfs has no device to bypass).
    static func file(_ bytes: [UInt8]) throws -> String {
        let path = "/var/tmp/exactio-direct-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    static func openDirect(_ path: String) throws -> FileDescriptor {
        let fd = ctest_open_direct(path)
        guard fd >= 0 else { throw Errno(rawValue: -fd) }
        return FileDescriptor(rawValue: fd)
    }

    @Test(arguments: testBackends, [4096 * 300, 4096 * 300 + 1234])
    func framesAtEveryOffsetAndTheTailOfTheFile(backend: ExactReader.Backend, size: Int) throws {
        // Frames of many sizes, straddling block boundaries; the last one ends at the file's end.
        var wire: [UInt8] = []
        var bodies: [[UInt8]] = []
        var k: UInt64 = 0
        while true {
            let n = [0, 1, 100, 4091, 4096, 5000, 70_000, 300_000][Int(k % 8)]
            let left = size - wire.count - 4
            if left < 0 { break }
            let body = pattern(min(n, left), seed: k)
            bodies.append(body)
            wire += frame(body)
            k += 1
        }
        wire += pattern(size - wire.count, seed: 99)  // a trailing partial frame's worth
        let path = try Self.file(wire)
        defer { unlink(path) }
        let fd = try Self.openDirect(path)
        defer { try? fd.close() }
        let r = try ExactReader(fd, options: options(backend))
        #expect(r.isDirectIO, "\(r.directIOFallbackReason ?? "")")
        for b in bodies {
            #expect(try r.readFrame() == ByteView(b))
        }
        let rest = size - bodies.reduce(0) { $0 + 4 + $1.count }
        if rest > 0 {
            #expect(try r.readExactly(rest) == ByteView(wire[(size - rest)...]))
        }
        #expect(r.isAtEOF)
        #expect(try r.readFrame() == nil)
    }

    @Test(arguments: testBackends)
    func blockAlignedFramesCostNoCopy(backend: ExactReader.Backend) throws {
        let block = 4 << 20
        let bytes = pattern(3 * block, seed: 3)
        let path = try Self.file(bytes)
        defer { unlink(path) }
        let fd = try Self.openDirect(path)
        defer { try? fd.close() }
        let r = try ExactReader(fd, options: options(backend, staging: 256 << 10))
        for i in 0..<3 {
            #expect(try r.readExactly(block) == ByteView(bytes[(i * block)..<((i + 1) * block)]))
        }
        #expect(r.statistics.bytesCopied == 0)
        if backend == .ioUring { #expect(r.statistics.fixedReads > 0) }
    }

    @Test(arguments: testBackends)
    func anUnalignedFrameCopiesOnlyItsHeadAndTailBlocks(backend: ExactReader.Backend) throws {
        let body = pattern(8 << 20, seed: 4)
        let bytes = frame(pattern(1000)) + frame(body) + frame(pattern(10))
        let path = try Self.file(bytes)
        defer { unlink(path) }
        let fd = try Self.openDirect(path)
        defer { try? fd.close() }
        let r = try ExactReader(fd, options: options(backend, staging: 64 << 10))
        _ = try r.readFrame()
        let before = r.statistics.bytesCopied
        #expect(try r.readFrame() == ByteView(body))
        #expect(try r.readFrame() == ByteView(pattern(10)))
        // Staged head (at most staging) + the tail block's bytes.
        #expect(r.statistics.bytesCopied - before <= (64 << 10) + 2 * 4096)
    }

    @Test(arguments: testBackends)
    func theOptionTurnsODirectOnAndPositionalReadsWork(backend: ExactReader.Backend) throws {
        let bytes = pattern(1 << 20, seed: 5)
        let path = try Self.file(bytes)
        defer { unlink(path) }
        let fd = try FileDescriptor.open(path, .readOnly)
        defer { try? fd.close() }
        var o = options(backend)
        o.directIO = true
        let r = try ExactReader(fd, options: o)
        #expect(r.isDirectIO, "\(r.directIOFallbackReason ?? "")")
        #expect(try r.readExactly(10) == ByteView(bytes[0..<10]))
        for (count, offset) in [(4096, 8192), (100, 5), (70_000, 123_457), (10, (1 << 20) - 10)] {
            #expect(try r.readExactly(count, at: Int64(offset)) == ByteView(bytes[offset..<(offset + count)]))
        }
        #expect(throws: ExactReadError.incomplete(partial: ByteView(bytes[((1 << 20) - 5)...]), expected: 10)) {
            try r.readExactly(10, at: (1 << 20) - 5)
        }
        #expect(try r.readExactly(20) == ByteView(bytes[10..<30]), "positional reads leave the stream alone")
    }

    @Test(arguments: testBackends)
    func forwardFromAnODirectFileGoesThroughStaging(backend: ExactReader.Backend) throws {
        let bytes = pattern(3_000_000, seed: 10)
        let path = try Self.file(bytes)
        defer { unlink(path) }
        let fd = try Self.openDirect(path)
        defer { try? fd.close() }
        let (out, outPath) = try tempFile(containing: [])
        defer { try? out.close(); unlink(outPath) }
        let r = try ExactReader(fd, options: options(backend))
        #expect(try r.readExactly(7) == ByteView(bytes[0..<7]))
        #expect(try r.forward(exactly: 2_000_000, to: out) == 2_000_000)
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: outPath))) == Array(bytes[7..<2_000_007]))
        do {
            try r.forward(exactly: 1_000_000, to: out)
            Issue.record("forward past the end of the file succeeded")
        } catch let e as ForwardError {
            #expect(e.forwarded == bytes.count - 2_000_007)
        }
    }

    @Test func startingInsideABlock() throws {
        let bytes = pattern(100_000, seed: 6)
        let path = try Self.file(bytes)
        defer { unlink(path) }
        let fd = try Self.openDirect(path)
        defer { try? fd.close() }
        _ = try fd.seek(offset: 5000, from: .start)
        let r = try ExactReader(fd)
        #expect(r.isDirectIO)
        #expect(try r.readExactly(95_000) == ByteView(bytes[5000...]))
    }

    @Test(arguments: testBackends)
    func tmpfsReadsCorrectlyOrFallsBackWithAReason(backend: ExactReader.Backend) throws {
        // tmpfs refused O_DIRECT (EINVAL) before Linux 6.6; since, it accepts it as buffered I/O.
        // A path of its own per case: the cases of both backends run at once.
        let path = "/dev/shm/exactio-direct-\(getpid())-\(backend)-\(UInt64.random(in: 0...UInt64.max))"
        let bytes = pattern(200_000, seed: 7)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        defer { unlink(path) }
        let fd = try FileDescriptor.open(path, .readOnly)
        defer { try? fd.close() }
        var o = options(backend)
        o.directIO = true
        let r = try ExactReader(fd, options: o)
        #expect(r.isDirectIO != (r.directIOFallbackReason != nil))
        if let why = r.directIOFallbackReason { #expect(why.contains("page cache")) }
        #expect(try r.readExactly(bytes.count) == ByteView(bytes))
    }

    @Test func aFilesystemThatRefusesIsAReasonNotAnError() throws {
        // /proc files refuse O_DIRECT: the reader reads them through the page cache and says so.
        let fd = try FileDescriptor.open("/proc/self/status", .readOnly)
        defer { try? fd.close() }
        var o = ExactReader.Options()
        o.directIO = true
        let r = try ExactReader(fd, options: o)
        #expect(!r.isDirectIO)
        #expect(r.directIOFallbackReason?.contains("O_DIRECT not used") == true)
        #expect(try r.readExactly(5) == ByteView(Array("Name:".utf8)))
    }

    #if EXACTIO_URING
    @Test(.enabled(if: uringAvailable), arguments: [false, true], [1, 4, 16])
    func readsInFlightCompletingOutOfOrderDeliverInOrder(direct: Bool, depth: Int) throws {
        let size = (9 << 20) + 777
        let bytes = pattern(size, seed: 8)
        let path = try Self.file(bytes)
        defer { unlink(path) }
        let fd = direct ? try Self.openDirect(path) : try FileDescriptor.open(path, .readOnly)
        defer { try? fd.close() }
        var o = options(.ioUring)
        o.queueDepth = depth
        let r = try ExactReader(fd, options: o)
        let uring = try #require((r.oDirectEngine?.inner ?? r.engine) as? URingEngine)
        uring.shuffleCompletions(true)
        #expect(try r.readExactly(100) == ByteView(bytes[0..<100]))
        #expect(try r.readExactly(6 << 20) == ByteView(bytes[100..<(100 + (6 << 20))]))
        let rest = size - 100 - (6 << 20)
        #expect(throws: ExactReadError.incomplete(partial: ByteView(bytes[(100 + (6 << 20))...]), expected: rest + 1)) {
            try r.readExactly(rest + 1)
        }
        if !direct {
            #expect(try fd.seek(offset: 0, from: .current) == Int64(size), "the position follows the bytes read")
        }
        #expect(r.statistics.reads >= (depth > 1 ? 6 : 1))
    }
    #endif
}
