// The C library, imported once for the whole module (Glibc on Linux, Musl for static Linux
// builds, Darwin elsewhere): every file sees the same system interfaces, and no file repeats
// the block. Re-exported, as Foundation re-exports it: code that imports ExactIO sees the C
// library too.
#if canImport(Glibc)
@_exported import Glibc
#elseif canImport(Musl)
@_exported import Musl
#elseif canImport(Darwin)
@_exported import Darwin
#endif
#if os(Linux)
import CExactIOLinux
#endif
import SystemPackage

// What differs between the C libraries ExactIO is built on (Glibc, Musl, Darwin), in one place:
// constants imported with different types, calls one platform lacks. Linux-only interfaces
// (epoll, eventfd, splice, O_DIRECT, io_uring) are not here: their files are under
// `#if os(Linux)` (or `#if EXACTIO_URING`) as a whole.

enum Platform {
    /// `SOCK_STREAM` as `socket(2)` takes it and `getsockopt(SO_TYPE)` gives it.
    static var streamSocketType: Int32 {
        #if canImport(Glibc)
        Int32(SOCK_STREAM.rawValue)
        #else
        SOCK_STREAM
        #endif
    }

    #if os(Linux)
    /// `SOCK_CLOEXEC` and `SOCK_NONBLOCK`, for the `type` of `socket(2)` and `accept4(2)`.
    static var socketCloseOnExec: Int32 {
        #if canImport(Glibc)
        Int32(SOCK_CLOEXEC.rawValue)
        #else
        SOCK_CLOEXEC
        #endif
    }
    static var socketNonBlocking: Int32 {
        #if canImport(Glibc)
        Int32(SOCK_NONBLOCK.rawValue)
        #else
        SOCK_NONBLOCK
        #endif
    }
    #endif

    /// `MAP_ANONYMOUS` (Darwin's headers spell it `MAP_ANON`).
    static var mapAnonymous: Int32 {
        #if canImport(Darwin)
        MAP_ANON
        #else
        MAP_ANONYMOUS
        #endif
    }

    /// `RLIMIT_MEMLOCK` as `getrlimit(2)` takes it.
    static var memlockResource: Int32 {
        #if canImport(Glibc)
        Int32(__RLIMIT_MEMLOCK.rawValue)
        #else
        RLIMIT_MEMLOCK
        #endif
    }

    /// A stream socket in `domain`, close-on-exec (and, on Darwin, writes to it never raise
    /// SIGPIPE). The descriptor, or -1 with `errno` set.
    static func streamSocket(domain: Int32) -> Int32 {
        #if os(Linux)
        return socket(domain, streamSocketType | socketCloseOnExec, 0)
        #else
        let fd = socket(domain, streamSocketType, 0)
        if fd >= 0 { prepareAccepted(fd, nonBlocking: false) }
        return fd
        #endif
    }

    /// One `accept(2)` on `listener`: the new descriptor non-blocking and close-on-exec (Linux:
    /// `accept4(2)`, atomically; elsewhere `accept(2)` then `fcntl(2)`, and on Darwin
    /// `SO_NOSIGPIPE`). The descriptor, or -1 with `errno` set.
    static func acceptNonBlocking(_ listener: Int32) -> Int32 {
        #if os(Linux)
        return cexactio_accept4(listener, socketCloseOnExec | socketNonBlocking)
        #else
        let fd = accept(listener, nil, nil)
        if fd >= 0 { prepareAccepted(fd, nonBlocking: true) }
        return fd
        #endif
    }

    #if !os(Linux)
    private static func prepareAccepted(_ fd: Int32, nonBlocking: Bool) {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        if nonBlocking { setNonBlocking(fd) }
        #if canImport(Darwin)
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, socklen_t(MemoryLayout<Int32>.size))
        #endif
    }
    #endif

    /// One non-blocking `sendmsg(2)` that never raises SIGPIPE: `MSG_NOSIGNAL` where the C
    /// library has it (Linux); on Darwin the socket gets `SO_NOSIGPIPE` first (a socket option:
    /// it holds for every descriptor of that socket). The bytes sent, or -1 with `errno` set.
    static func sendNoSignal(_ fd: Int32, _ msg: UnsafePointer<msghdr>) -> Int {
        #if canImport(Darwin)
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, socklen_t(MemoryLayout<Int32>.size))
        return sendmsg(fd, msg, MSG_DONTWAIT)
        #else
        return sendmsg(fd, msg, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
        #endif
    }

    /// Sets `O_NONBLOCK` on `fd` (if it is not set yet).
    static func setNonBlocking(_ fd: Int32) {
        let flags = fcntl(fd, F_GETFL)
        if flags >= 0 && flags & O_NONBLOCK == 0 { _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
    }

    /// A pipe whose two ends are non-blocking and close-on-exec (`pipe(2)`, then `fcntl(2)`:
    /// the same on every platform; a descriptor leaks into a child only if another thread
    /// forks in between).
    static func nonBlockingPipe() throws(Errno) -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw Errno(rawValue: errno) }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            setNonBlocking(fd)
        }
        return (fds[0], fds[1])
    }

    /// Starts a thread that runs `body` (pthreads: `pthread_t` is a number on Linux and a
    /// pointer on Darwin, and the start routine's argument is optional only on Linux).
    static func spawnThread(_ body: @escaping @Sendable () -> Void) throws(Errno) -> pthread_t {
        let start = Unmanaged.passRetained(ThreadStart(body)).toOpaque()
        #if canImport(Darwin)
        var tid: pthread_t? = nil
        let ret = pthread_create(&tid, nil, { arg in
            Unmanaged<ThreadStart>.fromOpaque(arg).takeRetainedValue().body()
            return nil
        }, start)
        #else
        var tid = pthread_t()
        let ret = pthread_create(&tid, nil, { arg in
            Unmanaged<ThreadStart>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, start)
        #endif
        guard ret == 0 else {
            Unmanaged<ThreadStart>.fromOpaque(start).release()
            throw Errno(rawValue: ret)
        }
        #if canImport(Darwin)
        return tid!
        #else
        return tid
        #endif
    }
}

/// What `Platform.spawnThread` hands its new thread.
private final class ThreadStart {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}
