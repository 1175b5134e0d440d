#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SystemPackage
import Testing
@testable import ExactIO

/// `forward(exactly:to:)` waits for a source or destination that would block, on both backends,
/// without burning CPU (issue 16, item 6: on io_uring, an empty non-blocking source or a full
/// non-blocking destination was `ForwardError(EAGAIN)` within a millisecond, and a destination
/// with a little room made it resubmit splices in a loop, a core at 100 %).
@Suite struct ForwardWaitTests {
    static func setNonBlocking(_ fd: FileDescriptor) {
        let flags = fcntl(fd.rawValue, F_GETFL)
        _ = fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
    }

    /// Fills `fd` (non-blocking) until even a 1-byte write would block; the bytes written.
    static func fill(_ fd: FileDescriptor) -> Int {
        let chunk = [UInt8](repeating: 0xEE, count: 4096)
        var total = 0
        for size in [4096, 1] {
            while true {
                let n = chunk.withUnsafeBytes { write(fd.rawValue, $0.baseAddress, size) }
                if n <= 0 { break }
                total += n
            }
        }
        return total
    }

    /// Reads `fd` until EOF after `delay` seconds; everything read.
    static func drain(_ fd: FileDescriptor, after delay: Double) -> (Writer, Locked<[UInt8]>) {
        let got = Locked<[UInt8]>([])
        let w = Writer {
            usleep(UInt32(delay * 1_000_000))
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = buf.withUnsafeMutableBytes { read(fd.rawValue, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                got.withLock { $0 += buf[0..<n] }
            }
            try fd.close()
        }
        return (w, got)
    }

    /// Blocks SIGPIPE for the calling (helper) thread: when forward fails, the test closes the
    /// reader's end before joining, and a writer still writing must get EPIPE, not kill the
    /// test process.
    static func blockSIGPIPE() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGPIPE)
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// A unix socket carrying `bytes`, written by a thread (SIGPIPE blocked), then closed.
    static func source(_ bytes: [UInt8]) throws -> (Channel, Writer) {
        let ch = try openChannel(.unix)
        let fd = ch.write!
        let writer = Writer {
            Self.blockSIGPIPE()
            defer { try? fd.close() }
            try bytes.withUnsafeBytes { try writeAll(fd, $0) }
        }
        return (ch, writer)
    }

    /// CPU seconds (user + system) of the calling thread.
    static func threadCPUSeconds() -> Double {
        cpuSeconds(1 /* RUSAGE_THREAD: the Glibc module declares it only with _GNU_SOURCE */)
    }

    /// CPU seconds (user + system) of `who` (RUSAGE_SELF: the process, io_uring's workers too).
    static func cpuSeconds(_ who: Int32) -> Double {
        var ru = rusage()
        getrusage(who, &ru)
        return Double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + Double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6
    }

    /// (a) An empty non-blocking source whose bytes arrive 300 ms later: forward waits for them.
    @Test(arguments: testBackends, [Transport.unix, .pipe])
    func anEmptyNonBlockingSourceIsWaitedFor(backend: ExactReader.Backend, transport: Transport) throws {
        let body = pattern(300_000, seed: 21)
        let ch = try openChannel(transport)
        Self.setNonBlocking(ch.read)
        let writeEnd = ch.write!
        let writer = Writer {
            Self.blockSIGPIPE()
            usleep(300_000)
            defer { try? writeEnd.close() }
            try body.withUnsafeBytes { try writeAll(writeEnd, $0) }
        }
        let (out, path) = try tempFile(containing: [])
        defer { try? out.close(); unlink(path) }
        let r = try ExactReader(ch.read, options: options(backend))
        let start = monotonicNanoseconds()
        do {
            #expect(try r.forward(exactly: body.count, to: out) == body.count)
        } catch {
            Issue.record("forward failed: \(error)")
        }
        let waited = Double(monotonicNanoseconds() - start) / 1e9
        ch.close()  // before joining: a writer left with unread bytes fails instead of blocking
        writer.join()
        #expect(waited >= 0.25, "forward returned after \(waited) s: before the bytes were sent")
        let written = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        let same = written == body  // a Bool: Swift Testing would diff two failing arrays for minutes
        #expect(same, "the file holds the body (\(written.count) bytes)")
    }

    /// (b) A full non-blocking destination (a socket whose reader drains after 500 ms): forward
    /// waits until it takes the bytes, without spinning. The body is in the source before the
    /// call (a full first splice: the destination's EAGAIN is what stops it).
    @Test(arguments: testBackends)
    func aFullNonBlockingDestinationIsWaitedFor(backend: ExactReader.Backend) throws {
        let body = pattern(100_000, seed: 22)
        let (source, peer) = try socketPair(AF_UNIX)
        try body.withUnsafeBytes { try writeAll(peer, $0) }  // fits in the socket's buffer
        try peer.close()
        let (sinkRead, sinkWrite) = try socketPair(AF_UNIX)
        Self.setNonBlocking(sinkWrite)
        let filler = Self.fill(sinkWrite)
        let (drainer, drained) = Self.drain(sinkRead, after: 0.5)
        let r = try ExactReader(source, options: options(backend))
        let cpu0 = Self.threadCPUSeconds()
        let start = monotonicNanoseconds()
        do {
            #expect(try r.forward(exactly: body.count, to: sinkWrite) == body.count)
        } catch {
            Issue.record("forward failed: \(error)")
        }
        let cpu = Self.threadCPUSeconds() - cpu0
        let waited = Double(monotonicNanoseconds() - start) / 1e9
        try sinkWrite.close()
        try source.close()
        drainer.join()
        #expect(waited >= 0.4, "forward returned after \(waited) s: before the destination was drained")
        #expect(cpu < 0.1, "forward used \(cpu) s of CPU while it waited \(waited) s")
        let got = drained.withLock { $0 }
        let intact = got.count == filler + body.count && got[filler...].elementsEqual(body)
        #expect(intact, "the destination got the body after the filler (\(got.count) bytes, expected \(filler + body.count))")
    }

    /// (c) The CPU forward uses while a non-blocking destination with a little room is full
    /// for about a second (its reader drains after 1 s): this thread's user + system time.
    @Test(arguments: testBackends)
    func waitingForADestinationCostsNoCPU(backend: ExactReader.Backend) throws {
        let body = pattern(1_000_000, seed: 23)
        let (ch, writer) = try Self.source(body)
        let (sinkRead, sinkWrite) = try socketPair(AF_UNIX)
        Self.setNonBlocking(sinkWrite)
        let filler = Self.fill(sinkWrite)
        // A little room: the reader takes 8 KiB, then nothing until 1 s has passed.
        var room = [UInt8](repeating: 0, count: 8192)
        let taken = room.withUnsafeMutableBytes { read(sinkRead.rawValue, $0.baseAddress, $0.count) }
        try #require(taken == 8192)
        let (drainer, drained) = Self.drain(sinkRead, after: 1.0)
        let r = try ExactReader(ch.read, options: options(backend))
        let cpu0 = Self.threadCPUSeconds()
        let process0 = Self.cpuSeconds(RUSAGE_SELF.rawValue)
        let start = monotonicNanoseconds()
        do {
            #expect(try r.forward(exactly: body.count, to: sinkWrite) == body.count)
        } catch {
            Issue.record("forward failed: \(error)")
        }
        let cpu = Self.threadCPUSeconds() - cpu0
        let processCPU = Self.cpuSeconds(RUSAGE_SELF.rawValue) - process0
        let waited = Double(monotonicNanoseconds() - start) / 1e9
        try sinkWrite.close()
        ch.close()  // before joining: a writer left with unread bytes fails instead of blocking
        drainer.join()
        writer.join()
        print("forward waiting for a destination (\(backend)): \(String(format: "%.3f", cpu)) s of this thread's CPU (\(String(format: "%.3f", processCPU)) s of the process's, other tests included) in \(String(format: "%.3f", waited)) s, \(r.statistics)")
        #expect(waited >= 0.8, "forward returned after \(waited) s: before the destination was drained")
        #expect(cpu < 0.1, "forward used \(cpu) s of CPU while it waited \(waited) s")
        let got = drained.withLock { $0 }
        let intact = got.count == filler - 8192 + body.count && got[(filler - 8192)...].elementsEqual(body)
        #expect(intact, "the destination got the body after the filler (\(got.count) bytes, expected \(filler - 8192 + body.count))")
    }

    /// (d) A blocking source that still says EAGAIN: a socket with SO_RCVTIMEO (20 ms) whose
    /// bytes come 200 ms later. forward waits for them (io_uring's splice returns EAGAIN when the
    /// timeout runs out: the rest goes the poll-driven way).
    @Test(arguments: testBackends)
    func aSourceWithAReceiveTimeoutIsWaitedFor(backend: ExactReader.Backend) throws {
        let body = pattern(1_000_000, seed: 24)
        let (source, peer) = try socketPair(AF_UNIX)
        var tv = timeval(tv_sec: 0, tv_usec: 20_000)
        setsockopt(source.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let writer = Writer {
            Self.blockSIGPIPE()
            usleep(200_000)
            defer { try? peer.close() }
            try body.withUnsafeBytes { try writeAll(peer, $0) }
        }
        let (out, path) = try tempFile(containing: [])
        defer { try? out.close(); unlink(path) }
        let r = try ExactReader(source, options: options(backend))
        do {
            #expect(try r.forward(exactly: body.count, to: out) == body.count)
        } catch {
            Issue.record("forward failed: \(error)")
        }
        try source.close()  // before joining: a writer left with unread bytes fails instead of blocking
        writer.join()
        let written = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        let same = written == body
        #expect(same, "the file holds the body (\(written.count) bytes)")
    }

    /// (e) A blocking destination that still says EAGAIN: a full socket with SO_SNDTIMEO (20 ms)
    /// drained after 500 ms. The source's bytes are there at once, so on io_uring the first
    /// splice fills the pipe and the second one times out: the bytes left in the pipe are
    /// written first when the destination drains, then the rest.
    @Test(arguments: testBackends)
    func aDestinationWithASendTimeoutIsWaitedFor(backend: ExactReader.Backend) throws {
        let body = pattern(100_000, seed: 25)
        let (source, peer) = try socketPair(AF_UNIX)
        try body.withUnsafeBytes { try writeAll(peer, $0) }  // fits in the socket's buffer
        try peer.close()
        let (sinkRead, sinkWrite) = try socketPair(AF_UNIX)
        Self.setNonBlocking(sinkWrite)
        let filler = Self.fill(sinkWrite)
        let flags = fcntl(sinkWrite.rawValue, F_GETFL)
        _ = fcntl(sinkWrite.rawValue, F_SETFL, flags & ~O_NONBLOCK)  // blocking again, full
        var tv = timeval(tv_sec: 0, tv_usec: 20_000)
        setsockopt(sinkWrite.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let (drainer, drained) = Self.drain(sinkRead, after: 0.5)
        let r = try ExactReader(source, options: options(backend))
        let cpu0 = Self.threadCPUSeconds()
        do {
            #expect(try r.forward(exactly: body.count, to: sinkWrite) == body.count)
        } catch {
            Issue.record("forward failed: \(error)")
        }
        let cpu = Self.threadCPUSeconds() - cpu0
        try sinkWrite.close()
        try source.close()
        drainer.join()
        #expect(cpu < 0.1, "forward used \(cpu) s of CPU while it waited")
        #expect(r.statistics.bytesCopied == 0, "the pipe's bytes were written on, not put back: \(r.statistics)")
        let got = drained.withLock { $0 }
        let intact = got.count == filler + body.count && got[filler...].elementsEqual(body)
        #expect(intact, "the destination got the body after the filler (\(got.count) bytes, expected \(filler + body.count))")
    }
}

/// Every failure of `forward(exactly:to:)` is a `ForwardError` with the bytes written so far
/// (issue 20: a failure to create its pipe, or to take the pipe's bytes back, was a bare `Errno`).
@Suite struct ForwardErrorTests {
    @Test(arguments: testBackends)
    func noDescriptorForThePipeIsAForwardErrorWithTheStagedBytesCounted(backend: ExactReader.Backend) async {
        let uring = backend.isURing
        printChild(await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) { [uring = uring as Bool] in
            try forwardWithoutDescriptorsChild(ExactReader.Backend(uring: uring))
        })
    }
}

extension ForwardErrorTests {
    /// The destination closes with bytes in the pipe, and there is no memory to take them back:
    /// a `ForwardError` (not a bare `Errno`) saying so, and the reader, which lost those bytes,
    /// throws that error from then on instead of reading on past the gap.
    @Test(arguments: testBackends)
    func noMemoryToPutThePipesBytesBackIsAForwardErrorAndEndsTheReader(backend: ExactReader.Backend) throws {
        let body = pattern(2_000_000, seed: 33)
        let (ch, writer) = try ForwardWaitTests.source(body)
        let (sinkRead, sinkWrite) = try socketPair(AF_UNIX)
        let sink = Writer {
            var buf = [UInt8](repeating: 0, count: 100_000)
            var got = 0
            while got < buf.count {
                let n = buf.withUnsafeMutableBytes { read(sinkRead.rawValue, $0.baseAddress! + got, $0.count - got) }
                if n <= 0 { break }
                got += n
            }
            try sinkRead.close()
        }
        let r = try ExactReader(ch.read, options: options(backend))
        r.pool.allocationFilter = { _ in false }  // every new block of memory is refused
        do {
            try r.forward(exactly: body.count, to: sinkWrite)
            Issue.record("forward succeeded into a closed socket")
        } catch let e as ForwardError {
            #expect(e.underlying as? Errno == .noMemory, "\(e)")
            #expect(e.forwarded >= 100_000 && e.forwarded < body.count)
        } catch {
            Issue.record("forward threw \(type(of: error)), not a ForwardError: \(error)")
        }
        #expect(throws: Errno.noMemory) { try r.readExactly(1) }
        #expect(throws: ForwardError.self) { try r.forward(exactly: 1, to: sinkWrite) }
        try sinkWrite.close()
        ch.close()
        sink.join()
        writer.join()
    }
}

/// In a child process: a reader with bytes staged, then no descriptor left (RLIMIT_NOFILE, and
/// every number under it taken): forward writes the staged bytes, cannot make its pipe, and
/// throws `ForwardError(forwarded: staged, underlying: EMFILE)`; once descriptors are free again,
/// the rest of the stream is read where forward stopped.
func forwardWithoutDescriptorsChild(_ backend: ExactReader.Backend) throws {
    let head = frame(pattern(10, seed: 31))
    let body = pattern(300_000, seed: 32)
    let (source, peer) = try socketPair(AF_UNIX)
    let writer = Writer {
        defer { try? peer.close() }
        try (head + body).withUnsafeBytes { try writeAll(peer, $0) }
    }
    let (out, path) = try tempFile(containing: [])
    defer { unlink(path) }
    let reader = try ExactReader(source, options: options(backend))
    guard try reader.readFrame() == ByteView(pattern(10, seed: 31)) else { exit(80) }
    // Exhaust the descriptor table: a low limit, then every free number under it.
    var limit = rlimit(rlim_cur: 256, rlim_max: 256)
    guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { exit(81) }
    var taken: [Int32] = []
    while true {
        let fd = dup(0)
        if fd < 0 { break }
        taken.append(fd)
    }
    guard errno == EMFILE else { exit(82) }
    var forwarded = -1
    do {
        try reader.forward(exactly: body.count, to: out)
        exit(83)
    } catch let e as ForwardError {
        guard e.underlying as? Errno == .tooManyOpenFiles, e.expected == body.count else {
            report("unexpected ForwardError: \(e)")
            exit(84)
        }
        forwarded = e.forwarded
    } catch {
        report("forward threw \(type(of: error)), not a ForwardError: \(error)")
        exit(85)
    }
    for fd in taken { close(fd) }
    let written = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
    guard forwarded > 0, forwarded < body.count, written == Array(body[0..<forwarded]) else {
        report("forwarded \(forwarded), file holds \(written.count) bytes")
        exit(86)
    }
    guard try reader.readExactly(body.count - forwarded) == ByteView(body[forwarded...]) else { exit(87) }
    writer.join()
    report("forward without a descriptor for its pipe (\(backend)): ForwardError(forwarded: \(forwarded), EMFILE); the stream went on from there")
}
