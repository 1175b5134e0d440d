#if canImport(CExactIOLinux)
import CExactIOLinux
#endif
import SystemPackage

// Waker: the loop's eventfd, owned and closed once.

/// The loop's eventfd, owned here and closed once. Any thread may `wake()` the loop (a reader
/// with work for it, the last view of a receive buffer going while connections starve for
/// buffers); views can outlive the loop, so after `close()` a wake does nothing: no write can
/// reach a descriptor number the process has reused since.
final class Waker: Sendable {
    /// The eventfd, or -1 once closed. Behind the lock so that a wake and the close never
    /// overlap.
    private let fd: Locked<Int32>
    /// The number, for registering it (the loop's thread, while it is open).
    let descriptor: Int32

    init() throws(Errno) {
        let efd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard efd >= 0 else { throw Errno(rawValue: errno) }
        self.fd = Locked(efd)
        self.descriptor = efd
    }

    deinit { close() }

    /// Makes the loop's next (or current) wait return.
    func wake() {
        fd.withLock { fd in
            guard fd >= 0 else { return }
            var one: UInt64 = 1
            _ = write(fd, &one, 8)
        }
    }

    /// Takes the pending wakeups (the loop's thread, after a wait ended on the eventfd).
    func drain() {
        fd.withLock { fd in
            guard fd >= 0 else { return }
            var value: UInt64 = 0
            _ = posixRead(fd, &value, 8)
        }
    }

    /// Sleeps until the loop is woken or `milliseconds` pass (a loop whose kernel interface
    /// failed waits here for its shutdown).
    func wait(milliseconds: Int32) {
        var pfd = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        if poll(&pfd, 1, milliseconds) > 0 { drain() }
    }

    func close() {
        fd.withLock { fd in
            guard fd >= 0 else { return }
            _ = posixClose(fd)
            fd = -1
        }
    }
}
