import SystemPackage

// Thin wrappers of the system calls the engines and the loop share (scriptable for the POSIX
// engine's fault tests), the clocks, and errno conversion.

/// The system calls the POSIX backend makes, as a value, so that fault tests can script short
/// reads, EINTR, EAGAIN, errors and EOF without a kernel doing it (swift-system's
/// `Internals/Syscalls.swift` + `Mocking.swift` idea, as an injected value instead of a global).
struct PosixSyscalls: Sendable {
    /// One `read(2)` (offset < 0) or `pread(2)`: bytes read (0 at end of stream) or the errno.
    var read: @Sendable (FileDescriptor, UnsafeMutableRawBufferPointer, Int64) -> Result<Int, Errno>
    /// Waits until the descriptor is readable, at most `timeout` nanoseconds (< 0: no limit).
    /// True when readable, false when the time ran out.
    var waitReadable: @Sendable (FileDescriptor, Int64) -> Result<Bool, Errno>
    /// Whether a read would return at once (poll with a zero timeout).
    var readiness: @Sendable (FileDescriptor) -> Readiness = { _ in .readable }

    static let live = PosixSyscalls(
        read: { fd, buffer, offset in
            // EINTR is handled by the caller's loop (one place: PosixEngine.read).
            do {
                if offset >= 0 {
                    return .success(try fd.read(fromAbsoluteOffset: offset, into: buffer, retryOnInterrupt: false))
                }
                return .success(try fd.read(into: buffer, retryOnInterrupt: false))
            } catch let e as Errno {
                return .failure(e)
            } catch {
                return .failure(.ioError)
            }
        },
        waitReadable: { fd, timeout in pollReadable(fd, timeout: timeout) },
        readiness: { fd in
            switch pollReadable(fd, timeout: 0) {
            case .success(true): .readable
            case .success(false): .notReadable
            case .failure(let e): .failed(e)
            }
        }
    )
}

/// Waits for POLLIN (also true on POLLHUP/POLLERR: a read returns at once) for at most
/// `timeout` nanoseconds (< 0: no limit, 0: just look). EINTR is retried with what is left.
/// POLLNVAL (the descriptor is not open) is `Errno.badFileDescriptor`.
func pollReadable(_ fd: FileDescriptor, timeout: Int64) -> Result<Bool, Errno> {
    let deadline = timeout > 0 ? monotonicNanoseconds() + timeout : 0
    var pfd = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
    while true {
        var ms: Int32 = -1
        if timeout == 0 {
            ms = 0
        } else if timeout > 0 {
            let left = deadline - monotonicNanoseconds()
            if left <= 0 { return .success(false) }
            ms = Int32(clamping: (left + 999_999) / 1_000_000)
        }
        let r = poll(&pfd, 1, ms)
        if r > 0 {
            if pfd.revents & Int16(POLLNVAL) != 0 { return .failure(.badFileDescriptor) }
            return .success(true)
        }
        if r == 0 {
            if timeout == 0 { return .success(false) }
            continue  // a rounding short of the deadline: the loop checks what is left
        }
        let e = Errno(rawValue: errno)
        if e != .interrupted { return .failure(e) }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock ExactIOCSupport's timeouts use).
@inline(__always)
/// CPU time the calling thread has used, in nanoseconds.
func threadCPUNanoseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

func monotonicNanoseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

/// The single conversion from ExactIOCSupport's `-errno` convention to `Errno`.
@inline(__always)
func errnoFromNegative(_ ret: Int32) -> Errno {
    Errno(rawValue: -ret)
}

/// `read(2)` and `close(2)` by names no type of ours shadows (a driver's `read` method would),
/// from whichever C library the platform has.
@inline(__always)
func posixRead(_ fd: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int) -> Int {
    read(fd, buffer, count)
}

@inline(__always)
@discardableResult
func posixClose(_ fd: Int32) -> Int32 {
    close(fd)
}
