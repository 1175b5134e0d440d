#if os(Linux)
import CExactIOLinux
#endif
import SystemPackage

// Waker: the descriptor another thread makes readable to end the loop's wait (an eventfd on
// Linux, a pipe elsewhere), owned and closed once.

/// What other threads write to end the loop's wait, owned here and closed once. Any thread may
/// `wake()` the loop (a reader with work for it, the last view of a receive buffer going while
/// connections starve for buffers); views can outlive the loop, so after `close()` a wake does
/// nothing: no write can reach a descriptor number the process has reused since.
///
/// Two kinds, the same to the loop (it waits for `descriptor` to be readable, then `drain()`s):
/// an eventfd (Linux; one descriptor, a counter), or a non-blocking pipe (every platform; the
/// read end is `descriptor`). A loop on `poll(2)` uses the pipe on Linux too, so that the pair
/// that runs where eventfd is missing is the pair Linux CI tests.
final class Waker: Sendable {
    enum Kind: Sendable {
        case eventfd
        case pipe
    }

    /// The descriptors, or -1 once closed. Behind the lock so that a wake and the close never
    /// overlap.
    private struct Ends {
        /// What the loop waits on (the eventfd, or the pipe's read end).
        var read: Int32
        /// What a wake writes to (the eventfd again, or the pipe's write end).
        var write: Int32
    }
    private let ends: Locked<Ends>
    /// The number the loop waits on, for registering it (the loop's thread, while it is open).
    let descriptor: Int32
    let kind: Kind

    /// The platform's kind: an eventfd on Linux, a pipe elsewhere.
    static var platformKind: Kind {
        #if os(Linux)
        .eventfd
        #else
        .pipe
        #endif
    }

    init(kind: Kind = Waker.platformKind) throws(Errno) {
        self.kind = kind
        switch kind {
        case .eventfd:
            #if os(Linux)
            let efd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
            guard efd >= 0 else { throw Errno(rawValue: errno) }
            self.ends = Locked(Ends(read: efd, write: efd))
            self.descriptor = efd
            #else
            throw Errno.notSupported
            #endif
        case .pipe:
            let (r, w) = try Platform.nonBlockingPipe()
            self.ends = Locked(Ends(read: r, write: w))
            self.descriptor = r
        }
    }

    deinit { close() }

    /// Makes the loop's next (or current) wait return.
    func wake() {
        ends.withLock { e in
            guard e.write >= 0 else { return }
            // An eventfd takes 8 bytes (added to its counter); a pipe one byte. A full pipe
            // (EAGAIN) already holds a wakeup the loop has not taken yet: nothing is lost.
            var one: UInt64 = 1
            _ = write(e.write, &one, kind == .eventfd ? 8 : 1)
        }
    }

    /// Takes the pending wakeups (the loop's thread, after a wait ended on `descriptor`).
    func drain() {
        ends.withLock { e in
            guard e.read >= 0 else { return }
            switch kind {
            case .eventfd:
                var value: UInt64 = 0
                _ = posixRead(e.read, &value, 8)
            case .pipe:
                // Until the pipe is empty (EAGAIN): wakes that came together are one wakeup.
                var scratch: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
                let size = MemoryLayout.size(ofValue: scratch)
                while withUnsafeMutableBytes(of: &scratch, { posixRead(e.read, $0.baseAddress, size) }) == size {}
            }
        }
    }

    /// Sleeps until the loop is woken or `milliseconds` pass (a loop whose kernel interface
    /// failed waits here for its shutdown).
    func wait(milliseconds: Int32) {
        var pfd = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        if poll(&pfd, 1, milliseconds) > 0 { drain() }
    }

    func close() {
        ends.withLock { e in
            guard e.read >= 0 else { return }
            _ = posixClose(e.read)
            if e.write != e.read { _ = posixClose(e.write) }
            e = Ends(read: -1, write: -1)
        }
    }
}
