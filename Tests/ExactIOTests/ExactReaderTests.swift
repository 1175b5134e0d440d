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

@Suite struct ExactReaderTests {
    static let combos: [(ExactReader.Backend, Transport)] = testBackends.flatMap { b in
        Transport.allCases.map { (b, $0) }
    }

    /// Sizes around every threshold: staging 64 KiB, direct reads from 16 KiB.
    static let sizes = [0, 1, 3, 100, 4096, 16383, 16384, 16385, 65535, 65536, 65537, 300_000, 3 << 20]

    @Test(arguments: combos)
    func framesOfEverySizeArriveIntact(backend: ExactReader.Backend, transport: Transport) throws {
        let bodies = Self.sizes.enumerated().map { pattern($1, seed: UInt64($0 + 1)) }
        let wire = bodies.flatMap(frame)
        let (ch, writer) = try stream(transport, wire, chunks: [7, 65536, 1000, 1 << 20])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(reader.backend == backend)
        var got: [ByteView] = []
        while let f = try reader.readFrame() { got.append(f) }
        writer.join()
        #expect(got.count == bodies.count)
        for (view, body) in zip(got, bodies) {
            #expect(view.count == body.count)
            #expect(view == ByteView(body))
        }
        #expect(reader.isAtEOF)
        #expect(try reader.readFrame() == nil)
        #expect(reader.statistics.bytesDelivered == bodies.reduce(0) { $0 + $1.count })
    }

    @Test(arguments: combos)
    func everyCallInterleaved(backend: ExactReader.Backend, transport: Transport) throws {
        let data = pattern(2 << 20, seed: 42)
        let (ch, writer) = try stream(transport, data, chunks: [4093, 1])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        var pos = 0
        func expectNext(_ bytes: some Collection<UInt8>) {
            #expect(ByteView(bytes) == ByteView(data[pos..<(pos + bytes.count)]), "at \(pos)")
            pos += bytes.count
        }
        expectNext(try reader.readExactly(10))
        expectNext(try reader.readExactly(100_000))  // direct
        try reader.skip(5000)
        pos += 5000
        let r = try reader.withExactly(777) { Array($0) }
        expectNext(r)
        let some = try reader.read(upTo: 50)
        #expect((1...50).contains(some.count))
        expectNext(some)
        var buf = [UInt8](repeating: 0, count: 200_000)
        try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        expectNext(buf)
        var small = [UInt8](repeating: 0, count: 3)
        try small.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        expectNext(small)
        try reader.skip(300_000)  // more than staging: loops
        pos += 300_000
        let big = try reader.read(upTo: 1 << 20)
        #expect(!big.isEmpty)
        expectNext(big)
        #expect(try reader.readExactly(0).isEmpty)
        // Drain the rest with read(upTo:), then EOF.
        while pos < data.count {
            let chunk = try reader.read(upTo: 70_000)
            try #require(!chunk.isEmpty, "stream ended at \(pos) of \(data.count)")
            expectNext(chunk)
        }
        #expect(try reader.read(upTo: 10).isEmpty)
        #expect(reader.isAtEOF)
        writer.join()
    }

    @Test(arguments: combos)
    func viewsOutliveManyLaterReads(backend: ExactReader.Backend, transport: Transport) throws {
        // Small frames are views into staging; holding them forces staging to be retired,
        // never overwritten.
        let bodies = (0..<3000).map { pattern(Int($0 % 97) * 31 + 1, seed: UInt64($0)) }
        let (ch, writer) = try stream(transport, bodies.flatMap(frame), chunks: [10_000, 3])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend, staging: 8192))
        var held: [ByteView] = []
        while let f = try reader.readFrame() { held.append(f) }
        writer.join()
        #expect(held.count == bodies.count)
        for (v, b) in zip(held, bodies) where Array(v) != b {
            Issue.record("a held view changed")
            break
        }
        #expect(reader.statistics.stagedViews > 0)
    }

    @Test(arguments: combos)
    func endOfStreamInsideTheBodyReturnsEveryByte(backend: ExactReader.Backend, transport: Transport) throws {
        for (length, sent) in [(10, 6), (100_000, 77_777), (1 << 20, 1)] {
            let body = pattern(sent, seed: UInt64(length))
            var wire = frame(pattern(length))
            wire.removeLast(length)
            wire += body
            let (ch, writer) = try stream(transport, wire)
            defer { ch.close() }
            let reader = try ExactReader(ch.read, options: options(backend))
            #expect {
                _ = try reader.readFrame()
            } throws: { error in
                guard case ExactReadError.incomplete(let partial, let expected) = error else { return false }
                return expected == length && Array(partial) == body
            }
            #expect(reader.isAtEOF)
            #expect(try reader.readFrame() == nil)
            writer.join()
        }
    }

    @Test(arguments: combos)
    func endOfStreamInsideThePrefix(backend: ExactReader.Backend, transport: Transport) throws {
        let (ch, writer) = try stream(transport, [0, 0])
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(throws: ExactReadError.incomplete(partial: ByteView([0, 0]), expected: 4)) {
            try reader.readFrame()
        }
        writer.join()
    }

    @Test(arguments: testBackends)
    func readExactlyIncompleteIntoCallerBuffer(backend: ExactReader.Backend) throws {
        for n in [10, 100_000] {
            let data = pattern(n - 3)
            let (ch, writer) = try stream(.unix, data)
            defer { ch.close() }
            let reader = try ExactReader(ch.read, options: options(backend))
            var buf = [UInt8](repeating: 0, count: n)
            #expect(throws: ExactReadError.incomplete(partial: ByteView(data), expected: n)) {
                try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
            }
            #expect(ByteView(buf[0..<(n - 3)]) == ByteView(data))
            writer.join()
        }
    }

    @Test(arguments: testBackends)
    func skipPastTheEnd(backend: ExactReader.Backend) throws {
        let (ch, writer) = try stream(.pipe, pattern(1000))
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        try reader.skip(400)
        #expect(throws: ExactReadError.incomplete(partial: ByteView(), expected: 100)) {
            try reader.skip(700)
        }
        #expect(reader.statistics.bytesSkipped == 1000)
        writer.join()
    }

    @Test(arguments: testBackends)
    func largeFrameCopiesAtMostTheStagingCapacity(backend: ExactReader.Backend) throws {
        // 64 MiB body behind a header, over a unix socket: user space copies only what was
        // staged when the large read began.
        let n = 64 << 20
        let ch = try openChannel(.unix)
        defer { ch.close() }
        let w = ch.write!
        let writer = Writer {
            defer { try? w.close() }
            var header = [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
            try header.withUnsafeMutableBytes { try writeAll(w, UnsafeRawBufferPointer($0)) }
            let chunk = pattern(1 << 20, seed: 9)
            for _ in 0..<64 { try chunk.withUnsafeBytes { try writeAll(w, $0) } }
        }
        let staging = 256 << 10
        let reader = try ExactReader(ch.read, options: .init(backend: backend, stagingCapacity: staging))
        let f = try #require(try reader.readFrame())
        writer.join()
        #expect(f.count == n)
        let chunk = pattern(1 << 20, seed: 9)
        #expect(f.subview(0..<(1 << 20)) == ByteView(chunk))
        #expect(f.subview((n - (1 << 20))..<n) == ByteView(chunk))
        let s = reader.statistics
        #expect(s.bytesCopied <= staging, "copied \(s.bytesCopied)")
        #expect(s.bytesDelivered == n)
        #expect(s.directReads >= 1)
        print("statistics, 64 MiB frame, \(backend), unix: \(s)")
    }

    @Test(arguments: testBackends)
    func peerResetIsAnErrno(backend: ExactReader.Backend) throws {
        let (server, client) = try tcpPair()
        defer { try? server.close() }
        let header: [UInt8] = [0, 0, 0x10, 0]  // 4096 bytes announced
        try header.withUnsafeBytes { try writeAll(client, $0) }
        try pattern(100).withUnsafeBytes { try writeAll(client, $0) }
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(client.rawValue, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        try client.close()  // RST
        let reader = try ExactReader(server, options: options(backend))
        #expect(throws: Errno.connectionReset) { try reader.readFrame() }
    }

    @Test(arguments: testBackends)
    func nonBlockingDescriptorsWaitForData(backend: ExactReader.Backend) throws {
        for transport in [Transport.pipe, .unix] {
            let bodies = [pattern(10), pattern(200_000), pattern(5)]
            let ch = try openChannel(transport)
            defer { ch.close() }
            let flags = fcntl(ch.read.rawValue, F_GETFL)
            _ = fcntl(ch.read.rawValue, F_SETFL, flags | O_NONBLOCK)
            let wire = bodies.flatMap(frame)
            let w = ch.write!
            let writer = Writer {
                defer { try? w.close() }
                var off = 0
                while off < wire.count {  // slow writer: the reader meets EAGAIN
                    let n = min(50_000, wire.count - off)
                    try wire.withUnsafeBytes { try writeAll(w, UnsafeRawBufferPointer(rebasing: $0[off..<(off + n)])) }
                    off += n
                    usleep(2000)
                }
            }
            let reader = try ExactReader(ch.read, options: options(backend))
            for b in bodies { #expect(try reader.readFrame() == ByteView(b)) }
            #expect(try reader.readFrame() == nil)
            writer.join()
        }
    }

    @Test(arguments: combos)
    func isAtEOFWithoutAnExtraRead(backend: ExactReader.Backend, transport: Transport) throws {
        let data = pattern(1000)
        let (ch, writer) = try stream(transport, data)
        defer { ch.close() }
        writer.join()  // the writer has closed its end
        let reader = try ExactReader(ch.read, options: options(backend))
        #expect(reader.isAtEOF == false, "1000 bytes are waiting")
        #expect(try reader.readExactly(1000) == ByteView(data))
        // Everything consumed and the peer gone: true, without a read returning nothing first.
        #expect(reader.isAtEOF)
        #expect(try reader.readFrame() == nil)
    }

    @Test(arguments: testBackends)
    func isAtEOFNeverBlocksOnAnOpenStream(backend: ExactReader.Backend) throws {
        let (a, b) = try socketPair(AF_UNIX)
        defer { try? a.close(); try? b.close() }
        let reader = try ExactReader(a, options: options(backend))
        #expect(reader.isAtEOF == false, "nothing sent, peer still open: not at the end, and no blocking")
        try ([1, 2, 3] as [UInt8]).withUnsafeBytes { try writeAll(b, $0) }
        #expect(reader.isAtEOF == false)
        #expect(try reader.readExactly(3) == ByteView([1, 2, 3]))
        #expect(reader.isAtEOF == false)
    }

    @Test func badDescriptorIsAnErrno() {
        #expect(throws: Errno.badFileDescriptor) { try ExactReader(FileDescriptor(rawValue: 987_654)) }
    }

    @Test func environmentForcesPosix() throws {
        let p = try FileDescriptor.pipe()
        defer { try? p.readEnd.close(); try? p.writeEnd.close() }
        let r = try ExactReader(fd: p.readEnd, options: .init(), syscalls: nil, environment: ["EXACTIO_BACKEND": "posix"])
        #expect(r.backend == .posix)
        #expect(r.fallbackReason?.contains("EXACTIO_BACKEND") == true)
        #expect(r.fallback?.step == .forcedByEnvironment && r.fallback?.errno == nil)
        #expect(r.fallback?.description == r.fallbackReason)
        let ignored = try ExactReader(fd: p.readEnd, options: .init(), syscalls: nil, environment: ["EXACTIO_BACKEND": "bogus"])
        #if EXACTIO_URING
        #expect(ignored.fallback?.step == .environmentIgnored)
        #else
        // Built without io_uring: that is the reason; the ignored value is still said.
        #expect(ignored.fallback?.step == .notInThisBuild)
        #endif
        #expect(ignored.fallbackReason?.contains("EXACTIO_BACKEND=bogus not understood") == true)
        if uringAvailable {
            // io_uring without registered buffers, by policy: a step, and no errno.
            let unregistered = try ExactReader(p.readEnd, options: .init(backend: .ioUring, registeredMemoryLimit: 0))
            #expect(unregistered.backend == .ioUring)
            #expect(unregistered.fallback?.step == .bufferRegistration && unregistered.fallback?.errno == nil)
        }
        // An explicit choice is not overridden.
        if uringAvailable {
            let u = try ExactReader(fd: p.readEnd, options: .init(backend: .ioUring), syscalls: nil, environment: ["EXACTIO_BACKEND": "posix"])
            #expect(u.backend == .ioUring)
        }
    }

    @Test func uringIsAvailableWhereRequired() {
        // On our CI, io_uring must work: no io_uring test may skip silently there.
        if uringRequired { #expect(uringAvailable, "EXACTIO_REQUIRE_URING=1 but io_uring is unavailable") }
        if uringAvailable {
            let p = try? FileDescriptor.pipe()
            let r = p.flatMap { try? ExactReader($0.readEnd) }
            #expect(r?.backend == .ioUring)
            if getuid() == 0 { #expect(r?.fallbackReason == nil, "root registers buffers: \(r?.fallbackReason ?? "")") }
            try? p?.readEnd.close()
            try? p?.writeEnd.close()
        }
    }

    @Test(arguments: testBackends)
    func callerRegisteredMemoryIsReadWithReadFixed(backend: ExactReader.Backend) throws {
        let data = pattern(1 << 20, seed: 5)
        let (ch, writer) = try stream(.unix, data)
        defer { ch.close() }
        let reader = try ExactReader(ch.read, options: options(backend))
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buf.deallocate() }
        let registered = reader.register(buf)
        #expect(registered == (backend == .ioUring && reader.fallbackReason == nil))
        try reader.readExactly(into: buf)
        #expect(ByteView(buf) == ByteView(data))
        if registered { #expect(reader.statistics.fixedReads > 0) }
        reader.unregister(buf)
        writer.join()
    }

    @Test(arguments: testBackends)
    func poolRecyclesAndReleasesBlocks(backend: ExactReader.Backend) throws {
        let bodies = (0..<20).map { pattern(1 << 20, seed: UInt64($0)) }
        let (ch, writer) = try stream(.unix, bodies.flatMap(frame))
        defer { ch.close() }
        var reader: ExactReader? = try ExactReader(ch.read, options: options(backend))
        let pool = reader!.pool
        var kept: ByteView? = nil
        while let f = try reader!.readFrame() { kept = f }  // one frame alive at a time
        writer.join()
        // Staging + the frame held + at most one recycled block.
        #expect(pool.snapshot.liveBlocks <= 3, "\(pool.snapshot)")
        reader!.releaseCachedMemory()
        #expect(pool.snapshot.freeBlocks == 0, "releaseCachedMemory empties the pool")
        #expect(pool.snapshot.liveBlocks == 2, "staging and the held frame")
        reader = nil
        #expect(pool.snapshot.liveBlocks == 1, "only the held view's block is left")
        #expect(kept.map(Array.init) == bodies.last)
        kept = nil
        #expect(pool.snapshot.liveBlocks == 0)
    }
}

/// The build without the io_uring part (the `IOUring` trait off, or `EXACTIO_NO_URING=1`): readers and loops work on the
/// POSIX backend and say why; demanding io_uring is an `Errno`, not a crash.
@Suite struct BuildWithoutURingTests {
    #if !EXACTIO_URING
    @Test func automaticReadersFallBackWithTheReasonAndDemandsAreRefused() async throws {
        let p = try FileDescriptor.pipe()
        defer { try? p.readEnd.close(); try? p.writeEnd.close() }
        let r = try ExactReader(fd: p.readEnd, options: .init(), syscalls: nil, environment: [:])
        #expect(r.backend == .posix)
        #expect(r.fallback?.step == .notInThisBuild)
        #expect(throws: Errno.notSupported) { try ExactReader(p.readEnd, options: .init(backend: .ioUring)) }
        #expect(!uringAvailable)
        let loop = try IOLoop()
        #expect(loop.backend == .posix)
        #expect(loop.fallbackReason?.contains("leaves it out") == true)
        await loop.shutdown()
        #expect(throws: Errno.notSupported) { try IOLoop(options: .init(backend: .ioUring)) }
    }
    #else
    @Test func theIOURingPartIsBuiltIn() throws {
        // With the io_uring part compiled in, no reader falls back for that reason.
        let p = try FileDescriptor.pipe()
        defer { try? p.readEnd.close(); try? p.writeEnd.close() }
        let r = try ExactReader(fd: p.readEnd, options: .init(), syscalls: nil, environment: [:])
        #expect(r.fallback?.step != .notInThisBuild)
    }
    #endif
}
