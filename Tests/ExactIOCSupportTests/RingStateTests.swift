// The C layer of the io_uring part: compiled only where it is (Linux, IOUring trait).
#if EXACTIO_URING
import ExactIOCSupport
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing

/// The ring's `broken` flag is read from other threads (a view released anywhere unregisters
/// its buffer, which checks the ring first) while the ring's owner may set it: it must be an
/// atomic (issue 16, "Also"). A plain `bool` was a data race, which CI's ThreadSanitizer run
/// reports on this test.
@Suite struct CSupportRingStateTests {
    /// The ring, shared with the watching thread (the C layer's state is what is under test).
    struct Shared: @unchecked Sendable { let ring: OpaquePointer }

    @Test(.enabled(if: CSupportTests.available)) func anotherThreadSeesTheRingBreak() throws {
        var r: OpaquePointer? = nil
        try #require(csupport_ring_create(8, 0, &r) == 0)
        let ring = try #require(r)
        defer { csupport_ring_destroy(ring) }
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let shared = Shared(ring: ring)
        let started = DispatchSemaphore(value: 0)
        let seen = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            started.signal()
            // What a view's release does on its thread: csupport_ring_check, via
            // csupport_register_slot (here through csupport_ring_usable, the same check).
            while csupport_ring_usable(shared.ring) == 0 { sched_yield() }
            seen.signal()
        }
        started.wait()
        usleep(10_000)
        // The owner breaks the ring: every wait for the read's completion fails.
        csupport_debug_fail_waits(ring, 1000, EIO)
        var buf = [UInt8](repeating: 0, count: 16)
        let (ret, _) = buf.withUnsafeMutableBytes { readC(ring, fds[0], $0.baseAddress, cap: 16, min: 1) }
        csupport_debug_fail_waits(ring, 0, 0)
        #expect(ret == -ENOTRECOVERABLE)
        #expect(seen.wait(timeout: .now() + 10) == .success, "the other thread saw the ring broken")
        #expect(csupport_ring_usable(ring) == -ENOTRECOVERABLE)
    }
}
#endif
