// The C layer of the io_uring part: compiled only where it is (Linux, IOUring trait).
#if EXACTIO_URING
import ExactIOCSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Testing

/// The C API directly: the happy path and an -errno path for each function.
/// One csupport_read call: (return value, what it did).
func readC(
    _ r: OpaquePointer?, _ fd: Int32, _ dst: UnsafeMutableRawPointer?, cap: Int, min: Int, slot: Int32 = -1,
    offset: Int64 = -1, timeoutNs: Int64 = 0
) -> (ret: Int32, res: csupport_read_res) {
    var req = csupport_read_req(fd: fd, slot: slot, dst: dst, cap: cap, min: min, offset: offset, timeout_ns: timeoutNs)
    var res = csupport_read_res()
    let ret = csupport_read(r, &req, &res)
    return (ret, res)
}

/// The C API directly: the happy path and an -errno path for each function.
@Suite(.serialized) struct CSupportTests {
    func ring() throws -> OpaquePointer {
        var r: OpaquePointer? = nil
        let ret = csupport_ring_create(8, 0, &r)
        try #require(ret == 0, "csupport_ring_create: \(ret)")
        return try #require(r)
    }

    static var available: Bool {
        var r: OpaquePointer? = nil
        defer { csupport_ring_destroy(r) }
        return csupport_ring_create(8, 0, &r) == 0
    }

    @Test func createRejectsZeroEntries() {
        var r: OpaquePointer? = nil
        #expect(csupport_ring_create(0, 0, &r) == -EINVAL)
        #expect(r == nil)
        csupport_ring_destroy(nil)  // accepted
    }

    @Test(.enabled(if: available)) func probeFindsTheOpcodesWeUse() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        let ops = csupport_ring_probe(r)
        for op in [CSUPPORT_OP_READ, CSUPPORT_OP_READ_FIXED, CSUPPORT_OP_POLL_ADD, CSUPPORT_OP_LINK_TIMEOUT,
                   CSUPPORT_OP_ASYNC_CANCEL] {
            #expect(ops & Int32(op) != 0, "opcode bit \(op)")
        }
        #expect(csupport_ring_probe(nil) == -EINVAL)
        #expect(csupport_ring_usable(r) == 0)
    }

    @Test(.enabled(if: available)) func singleIssuerIsKeptWhereTheKernelHasIt() throws {
        var r: OpaquePointer? = nil
        try #require(csupport_ring_create(8, UInt32(CSUPPORT_RING_SINGLE_ISSUER), &r) == 0)
        defer { csupport_ring_destroy(r) }
        // 6.1+ keeps SINGLE_ISSUER | DEFER_TASKRUN; older kernels fall back to COOP_TASKRUN.
        let flags = csupport_ring_setup_flags(r)
        #expect(flags & UInt32(CSUPPORT_RING_SINGLE_ISSUER | CSUPPORT_RING_COOP_TASKRUN) != 0)
    }

    @Test(.enabled(if: available)) func readFixedAndReadFromAPipe() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { buf.deallocate() }
        #expect(csupport_register_sparse(r, 4) == 0)
        #expect(csupport_register_slot(r, 1, buf.baseAddress, 8192) == 0)
        #expect(csupport_register_slot(r, 99, buf.baseAddress, 8192) < 0, "slot out of range")
        let msg = Array("hello, fixed buffers".utf8)
        _ = msg.withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) }
        // READ_FIXED: at least 5 bytes, up to the buffer.
        var (ret, res) = readC(r, fds[0], buf.baseAddress, cap: 8192, min: 5, slot: 1)
        #expect(ret == 0)
        #expect(res.done == msg.count)
        #expect(Array(buf[0..<res.done]) == msg)
        #expect(res.reads == 1 && res.fixed_reads == 1 && res.polls == 0)
        // Plain READ (slot -1) of exactly 3 bytes, then EOF.
        _ = msg.withUnsafeBytes { write(fds[1], $0.baseAddress, 3) }
        close(fds[1])
        (ret, res) = readC(r, fds[0], buf.baseAddress! + 100, cap: 3, min: 3)
        #expect(ret == 0 && res.done == 3 && res.fixed_reads == 0)
        (ret, res) = readC(r, fds[0], buf.baseAddress, cap: 10, min: 10)
        #expect(ret == 0 && res.done == 0, "end of stream: 0 with done < min")
        #expect(csupport_register_slot(r, 1, nil, 0) == 0, "clearing a slot")
        #expect(csupport_unregister_buffers(r) == 0)
        #expect(csupport_unregister_buffers(r) == -ENXIO)
    }

    @Test(.enabled(if: available)) func readReportsErrnoAndBadArguments() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var byte: UInt8 = 0
        #expect(readC(r, 987_654, &byte, cap: 1, min: 1).ret == -EBADF)
        #expect(readC(r, 0, &byte, cap: 1, min: 2).ret == -EINVAL, "min > cap")
        #expect(readC(nil, 0, &byte, cap: 1, min: 1).ret == -EINVAL)
        #expect(csupport_register_sparse(r, 0) == -EINVAL)
        #expect(csupport_register_slot(r, 0, nil, 10) == -EINVAL)
    }

    @Test(.enabled(if: available)) func wholeTableRegistration() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        let a = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { a.deallocate(); b.deallocate() }
        var bases: [UnsafeMutableRawPointer?] = [a.baseAddress, b.baseAddress]
        var lens = [4096, 4096]
        #expect(csupport_register_buffers(r, &bases, &lens, 2) == 0)
        #expect(csupport_register_buffers(r, &bases, &lens, 2) == -EBUSY, "already registered")
        #expect(csupport_unregister_buffers(r) == 0)
    }

    @Test(.enabled(if: available)) func timeoutCancelsTheReadAndLeavesNothingInFlight() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        var first = [UInt8](repeating: 0, count: 16)
        let t0 = monotonicNow()
        let (ret, res) = first.withUnsafeMutableBytes { readC(r, fds[0], $0.baseAddress, cap: 16, min: 1, timeoutNs: 50_000_000) }
        let waited = monotonicNow() - t0
        #expect(ret == -ETIMEDOUT && res.done == 0)
        #expect(waited >= 0.045 && waited < 2, "waited \(waited) s for a 50 ms timeout")
        // The timed-out read is gone: new bytes go to the next read, not into `first`.
        _ = [UInt8]([1, 2, 3]).withUnsafeBytes { write(fds[1], $0.baseAddress, 3) }
        var second = [UInt8](repeating: 0, count: 16)
        let (ret2, res2) = second.withUnsafeMutableBytes { readC(r, fds[0], $0.baseAddress, cap: 16, min: 3, timeoutNs: 1_000_000_000) }
        #expect(ret2 == 0 && res2.done == 3 && Array(second[0..<3]) == [1, 2, 3])
        #expect(first.allSatisfy { $0 == 0 }, "the cancelled read never wrote")
    }

    @Test(.enabled(if: available)) func failedWaitCancelsAndDrainsTheRequest() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        var first = [UInt8](repeating: 0, count: 16)
        // The wait for the read's completion fails once: the read (in flight on an empty pipe)
        // must be cancelled and its completion consumed before the call returns.
        csupport_debug_fail_waits(r, 1, EIO)
        let (ret, res) = first.withUnsafeMutableBytes { readC(r, fds[0], $0.baseAddress, cap: 16, min: 1) }
        #expect(ret == -EIO && res.done == 0)
        #expect(csupport_ring_usable(r) == 0, "drained: the ring is still usable")
        _ = [UInt8]([9, 8, 7]).withUnsafeBytes { write(fds[1], $0.baseAddress, 3) }
        var second = [UInt8](repeating: 0, count: 16)
        let (ret2, res2) = second.withUnsafeMutableBytes { readC(r, fds[0], $0.baseAddress, cap: 16, min: 3) }
        #expect(ret2 == 0 && res2.done == 3 && Array(second[0..<3]) == [9, 8, 7], "no stale completion taken")
        #expect(first.allSatisfy { $0 == 0 }, "the cancelled read never wrote")
    }

    @Test(.enabled(if: available)) func persistentWaitFailureBreaksTheRing() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        var buf = [UInt8](repeating: 0, count: 16)
        csupport_debug_fail_waits(r, 1000, EIO)
        let (ret, _) = buf.withUnsafeMutableBytes { readC(r, fds[0], $0.baseAddress, cap: 16, min: 1) }
        csupport_debug_fail_waits(r, 0, 0)
        #expect(ret == -ENOTRECOVERABLE)
        #expect(csupport_ring_usable(r) == -ENOTRECOVERABLE)
        #expect(buf.withUnsafeMutableBytes { readC(r, fds[0], $0.baseAddress, cap: 16, min: 1) }.ret == -ENOTRECOVERABLE,
                "nothing is submitted on a broken ring")
    }
}

func monotonicNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
#endif
