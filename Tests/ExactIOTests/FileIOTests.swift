#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SystemPackage
import Testing
@testable import ExactIO

/// Positional reads, chunks, and forwarding (issue: files at device speed, frames larger than
/// memory).
@Suite struct PositionalReadTests {
    @Test(arguments: testBackends)
    func positionalReadsLeaveTheStreamAndTheFilePositionAlone(backend: ExactReader.Backend) throws {
        let bytes = pattern(300_000, seed: 9)
        let (fd, path) = try tempFile(containing: bytes)
        defer { try? fd.close(); unlink(path) }
        let r = try ExactReader(fd, options: options(backend))
        #expect(try r.readExactly(10) == ByteView(bytes[0..<10]))
        let staged = r.statistics.reads
        // Small and large, at offsets before, inside and after what the stream has staged.
        for (count, offset) in [(4096, 123_457), (5, 0), (200_000, 99_999), (1, 299_999), (70_000, 3)] {
            #expect(try r.readExactly(count, at: Int64(offset)) == ByteView(bytes[offset..<(offset + count)]))
        }
        #expect(r.statistics.reads > staged)
        #expect(try r.readExactly(20) == ByteView(bytes[10..<30]), "the stream went on where it was")
        let position = try fd.seek(offset: 0, from: .current)
        _ = try r.readExactly(100, at: 1000)
        #expect(try fd.seek(offset: 0, from: .current) == position, "pread semantics: the position does not move")
        #expect(try r.readExactly(0, at: 5) == ByteView())
    }

    @Test(arguments: testBackends)
    func pastTheEndIsIncompleteWithTheBytesThatExist(backend: ExactReader.Backend) throws {
        let bytes = pattern(10_000)
        let (fd, path) = try tempFile(containing: bytes)
        defer { try? fd.close(); unlink(path) }
        let r = try ExactReader(fd, options: options(backend))
        #expect(throws: ExactReadError.incomplete(partial: ByteView(bytes[9_000...]), expected: 2_000)) {
            try r.readExactly(2_000, at: 9_000)
        }
        #expect(throws: ExactReadError.incomplete(partial: ByteView(), expected: 100_000)) {
            try r.readExactly(100_000, at: 20_000)
        }
        #expect(try r.readFrame(prefix: .uint8) != nil, "the stream is untouched")
    }

    @Test(arguments: testBackends)
    func streamsAreRefused(backend: ExactReader.Backend) throws {
        let (ch, writer) = try stream(.unix, pattern(100))
        defer { ch.close() }
        let r = try ExactReader(ch.read, options: options(backend))
        #expect(throws: Errno.illegalSeek) { try r.readExactly(10, at: 0) }
        #expect(try r.readExactly(100) == ByteView(pattern(100)))
        writer.join()
    }
}

@Suite struct ChunksTests {
    @Test(arguments: testBackends, [Transport.unix, .file])
    func chunksCoverTheBodyInOrderThenTheStreamGoesOn(backend: ExactReader.Backend, transport: Transport) throws {
        let body = pattern(1_000_003, seed: 4)
        let (ch, writer) = try stream(transport, body + [1, 2, 3])
        defer { ch.close() }
        let r = try ExactReader(ch.read, options: options(backend, staging: 64 << 10))
        var chunks = r.chunks(of: body.count, maxChunk: 64 << 10)
        var got: [UInt8] = []
        var sizes: Set<Int> = []
        while let c = try chunks.next() {
            sizes.insert(c.count)
            got += c.array
        }
        #expect(got == body)
        #expect(chunks.delivered == body.count && chunks.remaining == 0)
        #expect(sizes.max() == 64 << 10)
        #expect(try chunks.next() == nil)
        #expect(try r.readExactly(3) == ByteView([1, 2, 3]))
        writer.join()
    }

    @Test(arguments: testBackends)
    func aStreamThatEndsEarlyIsIncompleteWithTheCount(backend: ExactReader.Backend) throws {
        let sent = pattern(150_000)
        let (ch, writer) = try stream(.pipe, sent)
        defer { ch.close() }
        let r = try ExactReader(ch.read, options: options(backend))
        var chunks = r.chunks(of: 1 << 20, maxChunk: 64 << 10)
        var got: [UInt8] = []
        do {
            while let c = try chunks.next() { got += c.array }
            Issue.record("no error")
        } catch let ExactReadError.incomplete(partial, expected) {
            #expect(chunks.delivered == 131_072)
            #expect(expected == 64 << 10)
            got += partial.array
        }
        #expect(got == sent, "delivered + partial = every byte sent")
        writer.join()
    }

    @Test func zeroBytesIsNoChunk() throws {
        let (ch, writer) = try stream(.pipe, [])
        defer { ch.close() }
        let r = try ExactReader(ch.read)
        var chunks = r.chunks(of: 0, maxChunk: 10)
        #expect(try chunks.next() == nil)
        writer.join()
    }
}

@Suite struct ForwardTests {
    /// A sink: a file, or a socket whose other end a thread drains.
    @Test(arguments: testBackends, [Transport.unix, .tcp, .pipe, .file])
    func forwardToAFileMovesExactlyTheBytesAndTheStreamGoesOn(backend: ExactReader.Backend, transport: Transport) throws {
        let head = frame(pattern(100, seed: 1))
        let body = pattern(3_000_001, seed: 2)
        let tail = frame(pattern(7, seed: 3))
        let (ch, writer) = try stream(transport, head + body + tail, chunks: [100_000])
        defer { ch.close() }
        let (out, path) = try tempFile(containing: [])
        defer { try? out.close(); unlink(path) }
        let r = try ExactReader(ch.read, options: options(backend))
        #expect(try r.readFrame() == ByteView(pattern(100, seed: 1)))
        #expect(try r.forward(exactly: body.count, to: out) == body.count)
        #expect(try r.readFrame() == ByteView(pattern(7, seed: 3)))
        writer.join()
        let written = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(written == body)
    }

    @Test(arguments: testBackends)
    func forwardToASocket(backend: ExactReader.Backend) throws {
        let body = pattern(2_000_000, seed: 5)
        let (ch, writer) = try stream(.tcp, body)
        defer { ch.close() }
        let (sinkRead, sinkWrite) = try socketPair(AF_UNIX)
        let drained = Locked<[UInt8]>([])
        let drainer = Writer {
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = buf.withUnsafeMutableBytes { read(sinkRead.rawValue, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                drained.withLock { $0 += buf[0..<n] }
            }
            try sinkRead.close()
        }
        let r = try ExactReader(ch.read, options: options(backend))
        try r.forward(exactly: body.count, to: sinkWrite)
        try sinkWrite.close()
        drainer.join()
        writer.join()
        #expect(drained.withLock { $0 } == body)
    }

    @Test(arguments: testBackends)
    func aDestinationThatClosesIsBrokenPipeWithTheCountAndNothingIsLost(backend: ExactReader.Backend) throws {
        let body = pattern(4_000_000, seed: 6)
        let (ch, writer) = try stream(.unix, body)
        defer { ch.close() }
        let (sinkRead, sinkWrite) = try socketPair(AF_UNIX)
        defer { try? sinkWrite.close() }
        // The sink reads 100,000 bytes, then closes: the rest must fail with EPIPE, no signal.
        let taken = Locked<[UInt8]>([])
        let sink = Writer {
            var buf = [UInt8](repeating: 0, count: 100_000)
            var got = 0
            while got < buf.count {
                let n = buf.withUnsafeMutableBytes { read(sinkRead.rawValue, $0.baseAddress! + got, $0.count - got) }
                if n <= 0 { break }
                got += n
            }
            taken.withLock { $0 = Array(buf[0..<got]) }
            try sinkRead.close()
        }
        let r = try ExactReader(ch.read, options: options(backend))
        var forwarded = -1
        do {
            try r.forward(exactly: body.count, to: sinkWrite)
            Issue.record("forward succeeded into a closed socket")
        } catch let e as ForwardError {
            forwarded = e.forwarded
            #expect(e.underlying as? Errno == .brokenPipe || e.underlying as? Errno == .connectionReset, "\(e)")
            #expect(e.expected == body.count)
        }
        sink.join()
        #expect(forwarded >= 100_000 && forwarded < body.count)
        // Every byte after the forwarded ones is still the reader's.
        let rest = try r.readExactly(body.count - forwarded)
        #expect(rest == ByteView(body[forwarded...]))
        #expect(taken.withLock { $0 } == Array(body[0..<100_000]))
        writer.join()
    }

    @Test(arguments: testBackends)
    func aStreamThatEndsEarlyIsIncompleteWithTheCount(backend: ExactReader.Backend) throws {
        let sent = pattern(500_000, seed: 8)
        let (ch, writer) = try stream(.pipe, sent)
        defer { ch.close() }
        let (out, path) = try tempFile(containing: [])
        defer { try? out.close(); unlink(path) }
        let r = try ExactReader(ch.read, options: options(backend))
        _ = try r.readExactly(10)
        do {
            try r.forward(exactly: 1_000_000, to: out)
            Issue.record("no error")
        } catch let e as ForwardError {
            #expect(e.forwarded == sent.count - 10)
            #expect(e.underlying as? ExactReadError == .incomplete(partial: ByteView(), expected: 1_000_000 - e.forwarded))
        }
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: path))) == Array(sent[10...]))
        #expect(r.isAtEOF)
        writer.join()
    }
}
