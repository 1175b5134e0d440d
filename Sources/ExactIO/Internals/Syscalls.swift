import Glibc
import SystemPackage

/// The system calls the POSIX backend makes, as a value, so that fault tests can script short
/// reads, EINTR, EAGAIN, errors and EOF without a kernel doing it (swift-system's
/// `Internals/Syscalls.swift` + `Mocking.swift` idea, as an injected value instead of a global).
struct PosixSyscalls: Sendable {
    /// One `read(2)`: bytes read (0 at end of stream) or the errno.
    var read: @Sendable (FileDescriptor, UnsafeMutableRawBufferPointer) -> Result<Int, Errno>
    /// Blocks until the descriptor is readable (after EAGAIN on a non-blocking descriptor).
    var waitReadable: @Sendable (FileDescriptor) -> Result<Void, Errno>
    /// Whether the descriptor is readable right now (poll with a zero timeout).
    var isReadableNow: @Sendable (FileDescriptor) -> Bool = { _ in true }

    static let live = PosixSyscalls(
        read: { fd, buffer in
            // EINTR is handled by the caller's loop (one place: PosixEngine.read).
            do {
                return .success(try fd.read(into: buffer, retryOnInterrupt: false))
            } catch let e as Errno {
                return .failure(e)
            } catch {
                return .failure(.ioError)
            }
        },
        waitReadable: { fd in
            var pfd = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
            while true {
                let r = poll(&pfd, 1, -1)
                if r >= 0 { return .success(()) }
                let e = Errno(rawValue: errno)
                if e != .interrupted { return .failure(e) }
            }
        },
        isReadableNow: { fd in pollNow(fd) }
    )
}

/// A zero-timeout poll for POLLIN (also true on POLLHUP/POLLERR: a read returns at once).
func pollNow(_ fd: FileDescriptor) -> Bool {
    var pfd = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
    while true {
        let r = poll(&pfd, 1, 0)
        if r >= 0 { return r > 0 }
        if errno != EINTR { return false }
    }
}

/// The single conversion from CSupport's `-errno` convention to `Errno`.
@inline(__always)
func errnoFromNegative(_ ret: Int32) -> Errno {
    Errno(rawValue: -ret)
}
