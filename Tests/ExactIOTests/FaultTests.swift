import Synchronization
import SystemPackage
import Testing
@testable import ExactIO

/// A scripted descriptor: each step is what one read(2) does.
enum Step: Sendable {
    case bytes(Int)  // return up to this many of the next bytes
    case fail(Errno)
    case eof
}

final class Script: Sendable {
    let data: [UInt8]
    let state: Mutex<(pos: Int, step: Int, waits: Int, reads: Int)> = Mutex((0, 0, 0, 0))
    let steps: [Step]

    init(data: [UInt8], steps: [Step]) {
        self.data = data
        self.steps = steps
    }

    var syscalls: PosixSyscalls {
        PosixSyscalls(
            read: { _, buffer, _ in
                self.state.withLock { s in
                    s.reads += 1
                    let step = s.step < self.steps.count ? self.steps[s.step] : .bytes(Int.max)
                    s.step += 1
                    switch step {
                    case .fail(let e): return .failure(e)
                    case .eof: return .success(0)
                    case .bytes(let n):
                        let k = min(n, buffer.count, self.data.count - s.pos)
                        for i in 0..<k { buffer[i] = self.data[s.pos + i] }
                        s.pos += k
                        return .success(k)
                    }
                }
            },
            waitReadable: { _, _ in
                self.state.withLock { $0.waits += 1 }
                return .success(true)
            })
    }
}

func scriptedReader(_ script: Script, staging: Int = 4096) throws -> ExactReader {
    try ExactReader(fd: FileDescriptor(rawValue: 0), options: .init(backend: .posix, stagingCapacity: staging),
                    syscalls: script.syscalls, environment: [:])
}

@Suite struct FaultTests {
    @Test func eintrAndEagainAreRetriedAndShortReadsLoop() throws {
        let bodies = [pattern(3), pattern(20_000), pattern(7)]
        let wire = bodies.flatMap(frame)
        let steps: [Step] = [.fail(.interrupted), .bytes(1), .fail(.resourceTemporarilyUnavailable), .bytes(2),
                             .bytes(1), .fail(.interrupted), .bytes(5000), .fail(.resourceTemporarilyUnavailable),
                             .bytes(1)]
        let script = Script(data: wire, steps: steps)
        let reader = try scriptedReader(script)
        for b in bodies { #expect(try reader.readFrame() == ByteView(b)) }
        #expect(try reader.readFrame() == nil)
        #expect(script.state.withLock { $0.waits } == 2, "EAGAIN waits for readiness")
    }

    @Test func errorMidFrameLosesNothing() throws {
        // 10 000-byte body (direct read, staging 4096): an error after part of it arrived.
        let body = pattern(10_000)
        let script = Script(data: frame(body), steps: [.bytes(100), .bytes(3000), .fail(.connectionReset)])
        let reader = try scriptedReader(script)
        #expect(throws: Errno.connectionReset) { try reader.readFrame() }
        // The frame is not half-consumed: its prefix and the 3096 body bytes that arrived are
        // buffered, and a retry (the script now delivers the rest) reads the whole frame.
        #expect(reader.bufferedCount == 3100)
        #expect(try reader.readFrame() == ByteView(body))
        #expect(try reader.readFrame() == nil)
    }

    @Test func smallFrameErrorIsRetriable() throws {
        let bodies = [pattern(100), pattern(200)]
        let script = Script(data: bodies.flatMap(frame), steps: [.bytes(50), .fail(.ioError), .bytes(1000)])
        let reader = try scriptedReader(script)
        #expect(throws: Errno.ioError) { try reader.readFrame() }
        #expect(try reader.readFrame() == ByteView(bodies[0]))
        #expect(try reader.readFrame() == ByteView(bodies[1]))
    }

    @Test func skipCountsAsItGoes() throws {
        let script = Script(data: pattern(10_000), steps: [.bytes(3000), .fail(.ioError)])
        let reader = try scriptedReader(script)
        #expect(throws: Errno.ioError) { try reader.skip(8000) }
        #expect(reader.statistics.bytesSkipped == 3000)
        try reader.skip(7000)
        #expect(reader.statistics.bytesSkipped == 10_000)
        #expect(reader.isAtEOF, "the scripted stream is exhausted; isAtEOF finds out without a read call")
        #expect(try reader.read(upTo: 1).isEmpty)
    }

    @Test func errorDuringStagingFillKeepsBufferedBytes() throws {
        let data = pattern(100)
        let script = Script(data: data, steps: [.bytes(10), .fail(.ioError), .bytes(90)])
        let reader = try scriptedReader(script)
        #expect(try reader.readExactly(5) == ByteView(data[0..<5]))
        #expect(throws: Errno.ioError) { try reader.readExactly(20) }
        #expect(try reader.readExactly(95) == ByteView(data[5...]))
    }

    @Test func errorDuringReadIntoKeepsTheBytes() throws {
        let data = pattern(50_000)
        let script = Script(data: data, steps: [.bytes(1000), .bytes(20_000), .fail(.connectionReset)])
        let reader = try scriptedReader(script)
        var buf = [UInt8](repeating: 0, count: 50_000)
        #expect(throws: Errno.connectionReset) {
            try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        }
        try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        #expect(ByteView(buf) == ByteView(data))
    }

    @Test func errorDuringSmallReadIntoKeepsStagedBytes() throws {
        // Found by the fuzzer: 111 staged bytes were copied into the caller's buffer, then the
        // refill failed, and those bytes were gone from the stream.
        let data = pattern(300)
        let script = Script(data: data, steps: [.bytes(150), .fail(.connectionReset), .bytes(150)])
        let reader = try scriptedReader(script)
        #expect(try reader.readExactly(39) == ByteView(data[0..<39]))
        var buf = [UInt8](repeating: 0, count: 138)
        #expect(throws: Errno.connectionReset) {
            try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        }
        #expect(reader.bufferedCount == 111)
        try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        #expect(ByteView(buf) == ByteView(data[39..<177]))
        #expect(try reader.readExactly(123) == ByteView(data[177...]))
    }

    @Test func isAtEOFKeepsTheErrorItMeetsForTheNextRead() throws {
        let script = Script(data: pattern(20), steps: [.bytes(10), .fail(.connectionReset), .bytes(10)])
        let reader = try scriptedReader(script)
        #expect(try reader.readExactly(10) == ByteView(pattern(20)[0..<10]))
        #expect(reader.isAtEOF == false)
        #expect(throws: Errno.connectionReset) { try reader.readExactly(1) }
        #expect(try reader.readExactly(10) == ByteView(pattern(20)[10...]))
        #expect(reader.isAtEOF)
    }

    @Test func everyBlockReturnsAfterErrorsAndHeldViews() throws {
        // Mixed frames, errors mid-frame, views held past the reader: once the reader and the
        // views are gone, every block the pool mapped has been unmapped.
        let bodies = (0..<60).map { pattern(($0 * 7919) % 40_000, seed: UInt64($0)) }
        var steps: [Step] = []
        for k in 0..<400 { steps.append(k % 9 == 4 ? .fail(.connectionReset) : .bytes(1 + (k * 3571) % 9000)) }
        let script = Script(data: bodies.flatMap(frame), steps: steps)
        var reader: ExactReader? = try scriptedReader(script, staging: 8192)
        let pool = reader!.pool
        var held: [ByteView] = []
        var got: [ByteView] = []
        while true {
            do {
                guard let f = try reader!.readFrame() else { break }
                got.append(f)
                if got.count % 3 == 0 { held.append(f) }
            } catch is Errno {
                continue  // retry: nothing is lost
            }
        }
        #expect(got.count == bodies.count)
        for (v, b) in zip(got, bodies) where v != ByteView(b) { Issue.record("frame differs"); break }
        got.removeAll()
        reader = nil
        #expect(pool.snapshot.liveBlocks > 0, "held views keep their blocks")
        held.removeAll()
        #expect(pool.snapshot.liveBlocks == 0, "\(pool.snapshot)")
    }

    @Test func eofThenNothingMore() throws {
        let script = Script(data: pattern(10), steps: [.bytes(10), .eof])
        let reader = try scriptedReader(script)
        #expect(try reader.read(upTo: 100).count == 10)
        #expect(try reader.read(upTo: 100).isEmpty)
        #expect(reader.isAtEOF)
        #expect(throws: ExactReadError.incomplete(partial: ByteView(), expected: 1)) { try reader.readExactly(1) }
    }

    @Test func oneByteReadsEverywhere() throws {
        let bodies = (0..<50).map { pattern($0 * 300, seed: UInt64($0)) }
        let wire = bodies.flatMap(frame)
        let script = Script(data: wire, steps: Array(repeating: .bytes(1), count: wire.count))
        let reader = try scriptedReader(script)
        for b in bodies { #expect(try reader.readFrame() == ByteView(b)) }
        #expect(try reader.readFrame() == nil)
    }
}
