import Synchronization
import SystemPackage

// OwnedDescriptor: the loop's own duplicate of a descriptor it registers, closed once.

/// A descriptor the loop owns: a duplicate of the caller's (close-on-exec), closed exactly
/// once. Every request and registration the loop makes for a connection or listener names
/// this number, never the caller's, so a caller who closes theirs early (and a new connection
/// that is given the same number) cannot be reached by a stale request or a late deregistration.
/// The cost is one descriptor per reader while it lives.
final class OwnedDescriptor: Sendable {
    let rawValue: Int32
    private let isOpen = Atomic<Bool>(true)

    /// Duplicates `fd`; `Errno` (EMFILE at the descriptor limit, EBADF) when it cannot.
    init(duplicating fd: FileDescriptor) throws(Errno) {
        let copy = fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw Errno(rawValue: errno) }
        self.rawValue = copy
    }

    deinit { close() }

    func close() {
        if isOpen.exchange(false, ordering: .acquiringAndReleasing) { _ = posixClose(rawValue) }
    }
}
