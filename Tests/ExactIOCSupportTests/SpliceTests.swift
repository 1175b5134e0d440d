// The C layer of the io_uring part: compiled only where it is (Linux, IOUring trait).
#if EXACTIO_URING
import ExactIOCSupport
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing

/// csupport_splice (IORING_OP_SPLICE) at a destination that would block: it returns -EAGAIN
/// with the pipe's bytes counted, at once, instead of resubmitting the splice until the
/// destination drains (issue 16, item 6: a core at 100 % for as long as it stayed full).
@Suite struct CSupportSpliceTests {
    @Test(.enabled(if: CSupportTests.available)) func aDestinationThatWouldBlockIsEAGAINWithTheBytesInThePipe() throws {
        var r: OpaquePointer? = nil
        try #require(csupport_ring_create(8, 0, &r) == 0)
        defer { csupport_ring_destroy(r) }
        // Source: 1,000 bytes, then the end of the stream. A splice of 64 KiB takes them and
        // comes up short, which breaks the link: the pipe's bytes are then moved by a splice of
        // their own (the loop that resubmitted on EAGAIN).
        var src: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &src) == 0)
        defer { close(src[0]) }
        let body = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try #require(body.withUnsafeBytes { write(src[1], $0.baseAddress, $0.count) } == body.count)
        close(src[1])
        // The pipe between them (64 KiB, the default capacity).
        var p: [Int32] = [-1, -1]
        try #require(pipe(&p) == 0)
        defer { close(p[0]); close(p[1]) }
        // Destination: a non-blocking socket, full.
        var dst: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &dst) == 0)
        _ = fcntl(dst[0], F_SETFL, fcntl(dst[0], F_GETFL) | O_NONBLOCK)
        var filler = 0
        let chunk = [UInt8](repeating: 0xEE, count: 4096)
        for size in [4096, 1] {
            while true {
                let n = chunk.withUnsafeBytes { write(dst[0], $0.baseAddress, size) }
                if n <= 0 { break }
                filler += n
            }
        }
        // The destination's reader drains it after 1 s (then the unfixed call ended too).
        let drainerDone = DispatchSemaphore(value: 0)
        let reader = dst[1]
        Thread.detachNewThread {
            usleep(1_000_000)
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while buf.withUnsafeMutableBytes({ read(reader, $0.baseAddress, $0.count) }) > 0 {}
            close(reader)
            drainerDone.signal()
        }

        var req = csupport_splice_req(in: src[0], out: dst[0], pipe_r: p[0], pipe_w: p[1], len: 65536, chunk: 65536)
        var res = csupport_splice_res()
        let start = monotonicNow()
        let ret = csupport_splice(r, &req, &res)
        let took = monotonicNow() - start
        close(dst[0])
        drainerDone.wait()

        var queued: Int32 = 0
        _ = ioctl(p[0], UInt(FIONREAD), &queued)
        #expect(ret == -EAGAIN, "csupport_splice returned \(ret) after \(took) s and \(res.submissions) submissions")
        #expect(took < 0.5, "it returned after \(took) s: it waited for the destination instead of returning")
        #expect(res.submissions < 10, "\(res.submissions) submissions: it resubmitted while the destination was full")
        #expect(res.moved == 0 && res.in_pipe == body.count, "moved \(res.moved), in the pipe \(res.in_pipe)")
        #expect(Int(queued) == res.in_pipe, "the pipe holds \(queued) bytes, in_pipe says \(res.in_pipe)")
        #expect(filler > 0)
    }
}
#endif
