#if os(Linux)
import CExactIOLinux
#endif
import SystemPackage

// forward(exactly:to:): the next bytes of the stream to another descriptor with splice, and
// ForwardError.

/// `forward(exactly:to:)` stopped before all its bytes were written. The stream stays
/// consistent: the first `forwarded` bytes went to the destination, and every byte after them
/// is still the reader's (buffered or unread), so the next call reads from there. (One
/// exception: bytes taken from the source that no memory could be found to put back; then
/// `underlying` is that allocation's `Errno`, and every later call of the reader throws it.)
public struct ForwardError: Error, Sendable, CustomStringConvertible {
    /// Bytes written to the destination before the failure.
    public let forwarded: Int
    /// Bytes the call was asked to forward.
    public let expected: Int
    /// Why it stopped: an `Errno` of the destination (`Errno.brokenPipe` when its reader closed)
    /// or of the source (`Errno.connectionReset`, `Errno.timedOut` with `Options.readTimeout`),
    /// or `ExactReadError.incomplete` when the stream ended first (its `partial` is empty: the
    /// bytes went to the destination; `expected` is what was missing).
    public let underlying: any Error & Sendable

    public var description: String {
        "forward stopped after \(forwarded) of \(expected) bytes: \(underlying)"
    }
}

extension ExactReader {
    /// Moves the next `count` bytes of the stream to `destination` (a file, a socket, a pipe)
    /// without bringing them into user space: the bytes already staged are written first, then
    /// the rest goes from the source descriptor through a pipe to the destination with
    /// `splice(2)`, the kernel moving page references where it can. Returns when all `count`
    /// bytes were written. Memory: the staging buffer and a pipe (up to 1 MiB), whatever
    /// `count` is.
    ///
    /// A blocking or non-blocking destination works (EAGAIN waits for POLLOUT, with
    /// `Options.readTimeout` as the deadline for the whole call). A destination whose reader
    /// closed is `Errno.brokenPipe` — never a SIGPIPE (blocked for the calling thread during
    /// each write).
    ///
    /// A non-blocking source or destination is waited for the same way (POLLIN, POLLOUT), and
    /// so is a blocking socket whose `SO_RCVTIMEO` or `SO_SNDTIMEO` runs out: the call never
    /// fails with EAGAIN and never spins. On io_uring, a call without a deadline whose two
    /// descriptors are blocking moves its bytes with IORING_OP_SPLICE; a non-blocking one (whose
    /// splice in io_uring's worker would return EAGAIN at once) is moved with `splice(2)`, and
    /// so is the rest of a call whose descriptor would block after all.
    ///
    /// - Returns: `count`.
    /// - Throws: `ForwardError`, always (never a bare `Errno`), with the bytes written so far
    ///   and the cause. Bytes taken from the source but not written (in the pipe when the
    ///   destination failed) are put back in the reader, so that its next read starts right
    ///   after the last forwarded byte. The one exception: when there is no memory to put them
    ///   back (`Errno.noMemory`), they are lost, and every later call of the reader throws that
    ///   error.
    @discardableResult
    public func forward(exactly count: Int, to destination: FileDescriptor) throws -> Int {
        precondition(count >= 0, "forward(exactly:to:): count must not be negative (got \(count))")
        if let e = core.brokenError { throw ForwardError(forwarded: 0, expected: count, underlying: e) }
        if lent != nil { pinLent() }
        let timeout = options.timeoutNanoseconds
        let deadline = timeout > 0 ? monotonicNanoseconds() + timeout : 0
        var forwarded = 0
        func fail(_ error: any Error & Sendable) -> ForwardError {
            ForwardError(forwarded: forwarded, expected: count, underlying: error)
        }
        // A pending look-ahead error is the source's: it comes first.
        if let e = core.pendingError, core.buffer.buffered == 0 {
            core.pendingError = nil
            throw fail(e)
        }
        // 1. Staged bytes: written from staging (the one user-space touch of this call).
        while forwarded < count && core.buffer.buffered > 0 {
            let w = writeStaged(upTo: count - forwarded, to: destination, deadline: deadline)
            forwarded += w.count
            if let e = w.error { throw fail(e) }
        }
        if forwarded == count { return count }
        if core.sawEOF {
            throw fail(ExactReadError.incomplete(partial: ByteView(), expected: count - forwarded))
        }
        // 2. The rest, source → pipe → destination.
        #if os(Linux)
        if oDirectEngine != nil {
            // O_DIRECT reads at the reader's own offsets, not the descriptor's position: through
            // staging (a DMA into registered memory, then the write).
            return try forwardByCopy(count, to: destination, deadline: deadline, already: forwarded)
        }
        let pipe: SplicePipe
        do {
            pipe = try splicePipe()
        } catch {
            throw fail(error)  // no pipe (EMFILE, ENFILE): nothing was taken from the source
        }
        /// Puts the pipe's bytes back in the reader (see `putBack`), or throws the `ForwardError`
        /// saying why it could not.
        func putBackOrFail(_ n: Int) throws(ForwardError) {
            do {
                try putBack(n, from: pipe.read)
            } catch {
                // No memory for them: the `n` bytes are lost to the stream. The pipe goes (a
                // later call starts with an empty one), and every later call of the reader
                // throws this error rather than read on as if nothing was missing.
                forwardPipe = nil
                core.brokenError = error
                throw fail(error)
            }
        }
        // Bytes taken from the source that the io_uring path left in the pipe (it stopped at a
        // descriptor that would block): written first by the poll-driven path below.
        var inPipe = 0
        // Whether a splice has written to the destination (it takes splices).
        var splicedOut = false
        #if EXACTIO_URING
        // IORING_OP_SPLICE runs each splice in a kernel worker, which never waits for a
        // non-blocking descriptor: it returns EAGAIN. Those, and calls with a deadline, take the
        // poll(2)-driven splice(2) path below, which waits for readiness.
        if deadline == 0, !Self.isNonBlocking(fileDescriptor), !Self.isNonBlocking(destination),
           let uring = engine as? URingEngine,
           let r = Self.withSIGPIPEBlocked({
               uring.splice(
                   to: destination.rawValue, pipeRead: pipe.read, pipeWrite: pipe.write, capacity: pipe.capacity,
                   count: count - forwarded)
           })
        {
            // io_uring: IORING_OP_SPLICE, source -> pipe -> destination linked per chunk.
            forwarded += r.moved
            splicedOut = r.moved > 0
            core.statistics.bytesDelivered &+= r.moved
            core.statistics.reads &+= r.submissions
            if let e = r.error {
                if e == .resourceTemporarilyUnavailable {
                    // A blocking descriptor that would block all the same (made non-blocking
                    // meanwhile, or a socket's SO_RCVTIMEO / SO_SNDTIMEO ran out): the path
                    // below waits for it, starting with the bytes left in the pipe.
                    inPipe = r.inPipe
                } else {
                    if r.inPipe > 0 { try putBackOrFail(r.inPipe) }
                    if !(e == .invalidArgument && r.moved == 0 && r.inPipe == 0) { throw fail(e) }
                    // Refused (a descriptor without splice support): the paths below decide.
                }
            } else if forwarded < count {
                core.sawEOF = true
                throw fail(ExactReadError.incomplete(partial: ByteView(), expected: count - forwarded))
            } else {
                return count
            }
        }
        #endif
        while forwarded < count {
            if inPipe == 0 {
                let want = min(count - forwarded, pipe.capacity)
                let r = spliceIn(want, into: pipe.write, deadline: deadline)
                switch r {
                case .failure(let e):
                    if e == .invalidArgument {
                        // splice refuses this source (one without splice support; nothing was
                        // taken from it): copy through staging instead.
                        return try forwardByCopy(count, to: destination, deadline: deadline, already: forwarded)
                    }
                    throw fail(e)
                case .success(0):
                    core.sawEOF = true
                    throw fail(ExactReadError.incomplete(partial: ByteView(), expected: count - forwarded))
                case .success(let got):
                    inPipe = got
                }
            }
            while inPipe > 0 {
                let out = spliceOut(inPipe, from: pipe.read, to: destination, deadline: deadline)
                switch out {
                case .success(let n):
                    splicedOut = true
                    inPipe -= n
                    forwarded += n
                    core.statistics.bytesDelivered &+= n
                case .failure(let e) where e == .invalidArgument && !splicedOut:
                    // splice refuses this destination: the pipe's bytes go back to the
                    // reader and the rest is copied through staging.
                    try putBackOrFail(inPipe)
                    return try forwardByCopy(count, to: destination, deadline: deadline, already: forwarded)
                case .failure(let e):
                    // The pipe's bytes were taken from the stream but not written: they go
                    // back to the reader, in front of whatever comes next.
                    try putBackOrFail(inPipe)
                    throw fail(e)
                }
            }
        }
        return count
        #else
        return try forwardByCopy(count, to: destination, deadline: deadline, already: forwarded)
        #endif
    }

    /// `forward` where splice cannot be used: staging-sized reads, then writes. One user-space
    /// copy per byte (the kernel's into staging is the other way round of the same copy).
    func forwardByCopy(_ count: Int, to destination: FileDescriptor, deadline: Int64, already: Int = 0) throws -> Int {
        var forwarded = already
        while forwarded < count {
            do {
                try fill(atLeast: 1)
            } catch {
                throw ForwardError(forwarded: forwarded, expected: count, underlying: error)
            }
            if core.buffer.buffered == 0 {
                throw ForwardError(
                    forwarded: forwarded, expected: count,
                    underlying: ExactReadError.incomplete(partial: ByteView(), expected: count - forwarded))
            }
            let w = writeStaged(upTo: count - forwarded, to: destination, deadline: deadline)
            forwarded += w.count
            if let e = w.error { throw ForwardError(forwarded: forwarded, expected: count, underlying: e) }
        }
        return count
    }

    /// Writes up to `limit` staged bytes (one contiguous run) to `destination`, consuming what
    /// was written.
    func writeStaged(upTo limit: Int, to destination: FileDescriptor, deadline: Int64) -> (count: Int, error: Errno?) {
        let staged = core.buffer.contiguousReadable
        let n = min(limit, staged.count)
        let w = Self.writeNoSignal(destination, UnsafeRawBufferPointer(rebasing: staged[0..<n]), deadline: deadline)
        core.buffer.consume(w.count)
        core.statistics.bytesDelivered &+= w.count
        return w
    }

    /// Writes all of `bytes` unless an error (or the deadline) stops it first.
    static func writeNoSignal(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, deadline: Int64) -> (count: Int, error: Errno?) {
        var done = 0
        while done < bytes.count {
            #if os(Linux)
            let n = cexactio_write_nosigpipe(fd.rawValue, bytes.baseAddress! + done, bytes.count - done)
            let e: Errno? = n < 0 ? Errno(rawValue: Int32(-n)) : nil
            #else
            let n = write(fd.rawValue, bytes.baseAddress! + done, bytes.count - done)
            let e: Errno? = n < 0 ? Errno(rawValue: errno) : nil
            #endif
            if let e {
                if e == .interrupted { continue }
                if e == .resourceTemporarilyUnavailable {
                    if let w = waitWritable(fd, deadline: deadline) { return (done, w) }
                    continue
                }
                return (done, e)
            }
            done += n
        }
        return (done, nil)
    }

    /// Waits for POLLOUT until `deadline` (0: none); the error that ends the wait, or nil.
    static func waitWritable(_ fd: FileDescriptor, deadline: Int64) -> Errno? {
        var pfd = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
        while true {
            var ms: Int32 = -1
            if deadline > 0 {
                let left = deadline - monotonicNanoseconds()
                if left <= 0 { return .timedOut }
                ms = Int32(clamping: (left + 999_999) / 1_000_000)
            }
            let r = poll(&pfd, 1, ms)
            if r > 0 { return pfd.revents & Int16(POLLNVAL) != 0 ? .badFileDescriptor : nil }
            if r < 0 && errno != EINTR { return Errno(rawValue: errno) }
        }
    }
}

#if os(Linux)
/// The pipe `forward` splices through, made on first use and kept for the reader's lifetime.
final class SplicePipe {
    let read: Int32
    let write: Int32
    let capacity: Int

    init() throws(Errno) {
        var fds: [Int32] = [-1, -1]
        var actual = 0
        let r = cexactio_splice_pipe(&fds, 1 << 20, &actual)
        if r < 0 { throw Errno(rawValue: -r) }
        read = fds[0]
        write = fds[1]
        capacity = actual
    }

    deinit {
        posixClose(read)
        posixClose(write)
    }
}

extension ExactReader {
    /// Runs `body` with SIGPIPE blocked for this thread (see `cexactio_sigpipe_block`).
    static func withSIGPIPEBlocked<R>(_ body: () -> R) -> R {
        var guardState = cexactio_sigpipe_guard()
        cexactio_sigpipe_block(&guardState)
        defer { cexactio_sigpipe_restore(&guardState) }
        return body()
    }

    /// Whether `fd` is in non-blocking mode (O_NONBLOCK); false when fcntl fails (the splice
    /// then reports the descriptor's error).
    static func isNonBlocking(_ fd: FileDescriptor) -> Bool {
        let flags = fcntl(fd.rawValue, F_GETFL)
        return flags >= 0 && flags & O_NONBLOCK != 0
    }

    func splicePipe() throws(Errno) -> SplicePipe {
        if let p = forwardPipe { return p }
        let p = try SplicePipe()
        forwardPipe = p
        return p
    }

    /// Source → pipe: up to `count` bytes (0 at end of stream). Waits for POLLIN on EAGAIN.
    func spliceIn(_ count: Int, into pipeWrite: Int32, deadline: Int64) -> Result<Int, Errno> {
        while true {
            if deadline > 0 {
                let left = deadline - monotonicNanoseconds()
                if left <= 0 { return .failure(.timedOut) }
                core.statistics.polls &+= 1
                switch pollReadable(fileDescriptor, timeout: left) {
                case .success(true): break
                case .success(false): return .failure(.timedOut)
                case .failure(let e): return .failure(e)
                }
            }
            core.statistics.reads &+= 1
            let n = cexactio_splice(fileDescriptor.rawValue, pipeWrite, count)
            if n >= 0 { return .success(n) }
            let e = Errno(rawValue: Int32(-n))
            if e == .interrupted { continue }
            if e == .resourceTemporarilyUnavailable {
                if deadline > 0 { continue }
                core.statistics.polls &+= 1
                if case .failure(let e) = pollReadable(fileDescriptor, timeout: -1) { return .failure(e) }
                continue
            }
            return .failure(e)
        }
    }

    /// Pipe → destination: at least one byte, at most `count`. Waits for POLLOUT on EAGAIN.
    func spliceOut(_ count: Int, from pipeRead: Int32, to destination: FileDescriptor, deadline: Int64) -> Result<Int, Errno> {
        while true {
            let n = cexactio_splice(pipeRead, destination.rawValue, count)
            if n > 0 { return .success(n) }
            if n == 0 { return .failure(.brokenPipe) }  // not expected with bytes in the pipe
            let e = Errno(rawValue: Int32(-n))
            if e == .interrupted { continue }
            if e == .resourceTemporarilyUnavailable {
                if let w = Self.waitWritable(destination, deadline: deadline) { return .failure(w) }
                continue
            }
            return .failure(e)
        }
    }

    /// Reads the `count` bytes left in the pipe into memory of their own and makes them the
    /// buffered start of the stream (the staging buffer is empty here: every staged byte was
    /// forwarded before the first splice).
    func putBack(_ count: Int, from pipeRead: Int32) throws(Errno) {
        guard count > 0 else { return }
        let region = Region(block: try pool.take(atLeast: count), pool: pool)
        var got = 0
        while got < count {
            let n = posixRead(pipeRead, region.base + got, count - got)
            if n > 0 {
                got += n
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break  // cannot happen: the bytes are in the pipe
            }
        }
        core.statistics.bytesCopied &+= got
        core.buffer.adopt(region, bytes: 0, got)
    }
}
#endif
