import CSupport
import Glibc
import Testing

/// The C API directly: the happy path and an -errno path for each function.
@Suite struct CSupportTests {
    func ring() throws -> OpaquePointer {
        var r: OpaquePointer? = nil
        let ret = csupport_ring_create(8, &r)
        try #require(ret == 0, "csupport_ring_create: \(ret)")
        return try #require(r)
    }

    static var available: Bool {
        var r: OpaquePointer? = nil
        defer { csupport_ring_destroy(r) }
        return csupport_ring_create(8, &r) == 0
    }

    @Test func createRejectsZeroEntries() {
        var r: OpaquePointer? = nil
        #expect(csupport_ring_create(0, &r) == -EINVAL)
        #expect(r == nil)
        csupport_ring_destroy(nil)  // accepted
    }

    @Test(.enabled(if: available)) func probeFindsTheOpcodesWeUse() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        let ops = csupport_ring_probe(r)
        #expect(ops & Int32(CSUPPORT_OP_READ) != 0)
        #expect(ops & Int32(CSUPPORT_OP_READ_FIXED) != 0)
        #expect(ops & Int32(CSUPPORT_OP_POLL_ADD) != 0)
        #expect(csupport_ring_probe(nil) == -EINVAL)
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
        var done = 0
        var subs: UInt64 = 0
        // READ_FIXED: at least 5 bytes, up to the buffer.
        #expect(csupport_read(r, fds[0], buf.baseAddress, 8192, 5, 1, 0, &done, &subs) == 0)
        #expect(done == msg.count)
        #expect(Array(buf[0..<done]) == msg)
        #expect(subs == 1)
        // Plain READ (slot -1) of exactly 3 bytes, then EOF.
        _ = msg.withUnsafeBytes { write(fds[1], $0.baseAddress, 3) }
        close(fds[1])
        #expect(csupport_read(r, fds[0], buf.baseAddress! + 100, 3, 3, -1, 0, &done, &subs) == 0)
        #expect(done == 3)
        #expect(csupport_read(r, fds[0], buf.baseAddress, 10, 10, -1, 0, &done, &subs) == 0)
        #expect(done == 0, "end of stream: 0 with done < min")
        #expect(csupport_register_slot(r, 1, nil, 0) == 0, "clearing a slot")
        #expect(csupport_unregister_buffers(r) == 0)
        #expect(csupport_unregister_buffers(r) == -ENXIO)
    }

    @Test(.enabled(if: available)) func readReportsErrnoAndBadArguments() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var byte: UInt8 = 0
        var done = 0
        var subs: UInt64 = 0
        #expect(csupport_read(r, 987_654, &byte, 1, 1, -1, 0, &done, &subs) == -EBADF)
        #expect(csupport_read(r, 0, &byte, 1, 2, -1, 0, &done, &subs) == -EINVAL, "min > cap")
        #expect(csupport_read(nil, 0, &byte, 1, 1, -1, 0, &done, &subs) == -EINVAL)
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

    @Test(.enabled(if: available)) func recvWaitAllOnASocket() throws {
        let r = try ring()
        defer { csupport_ring_destroy(r) }
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let payload = [UInt8](repeating: 7, count: 1000)
        _ = payload.withUnsafeBytes { write(fds[1], $0.baseAddress, 1000) }
        var out = [UInt8](repeating: 0, count: 1000)
        var done = 0
        var subs: UInt64 = 0
        let ret = out.withUnsafeMutableBytes {
            csupport_read(r, fds[0], $0.baseAddress, 1000, 1000, -1, UInt32(CSUPPORT_READ_RECV_WAITALL), &done, &subs)
        }
        #expect(ret == 0 && done == 1000 && out == payload)
    }
}
