import SystemPackage

// The narrow kernel interface of a loop: what `LoopMachine` asks of the kernel, and how the
// kernel's answers come back. Two real backends (io_uring, epoll) and one scripted (the fuzz
// harness). A backend decides nothing about connections: it carries out operations and
// reports each one's completions, in the same shape whatever the kernel does underneath
// (io_uring: requests and completions; epoll: readiness, then the syscall, reported as the
// completion the request would have had).

/// What a backend does, on the loop's thread only.
protocol LoopBackend: AnyObject {
    var kind: ExactReader.Backend { get }
    /// Whether `armReceive`'s limit ends a receive in the kernel (else the machine ends it).
    var limitsReceives: Bool { get }

    /// Receives on `c` into `target` until the receive ends: bytes come back as `.received`
    /// completions, the last one not `.more`. Returns the errno when it could not be started.
    func armReceive(_ c: LoopConnection, _ target: ReceiveTarget) -> Errno?
    /// Ends the armed receive early: its last completion follows (`.canceled`, or bytes that
    /// were already on their way).
    func disarmReceive(_ c: LoopConnection)
    /// One read of up to `dst.count` bytes straight into `dst` (a large body; `slot` names the
    /// registered buffer holding it, or -1): one `.read` completion follows.
    func read(_ c: LoopConnection, into dst: UnsafeMutableRawBufferPointer, slot: Int32) -> Errno?
    /// Ends the read in flight early: its completion follows (`.canceled` when nothing came).
    func cancelRead(_ c: LoopConnection)
    /// `c` leaves the loop: whatever the backend keeps registered for it goes.
    func forget(_ c: LoopConnection)

    /// Accepts up to `count` more connections on `l`: one `.accepted` completion each
    /// (a descriptor, or the errno that ended that accept). Returns how many were armed, and
    /// the errno that stopped the rest.
    func accept(_ l: Listener, count: Int) -> (armed: Int, error: Errno?)
    /// Ends every accept in flight on `l` (each completes with `.canceled`).
    func cancelAccepts(_ l: Listener)

    /// Receive buffers whose last user let go: to the kernel, or the backend's free list.
    func giveBack(_ bids: [UInt16])

    /// Submits what was asked, waits up to `timeout` nanoseconds (nil: until something
    /// happens; 0: not at all), and appends what completed to `completions`. Returns an errno
    /// when the kernel interface failed for good (a passing end of a wait, such as a signal,
    /// is not a failure).
    func turn(timeout: Int64?, resolve: (LoopToken) -> LoopEntry?, into completions: inout [LoopCompletion]) -> Errno?
    /// What the backend did since the last call (waits, read submissions or syscalls,
    /// completions), for `IOLoop.statistics`.
    func takeCounters() -> LoopCounters

    /// Shutdown (after the machine ended each connection's and listener's requests): ends
    /// whatever else is in flight, and stops re-arming the loop's wakeup.
    func cancelAll()
    /// Requests whose final completion has not come.
    var inFlight: Int { get }
    /// Releases the ring or epoll set (after shutdown, on the loop's thread).
    func close()

    /// Test seam: the next `count` waits fail with `errno` (io_uring only).
    func injectWaitFailures(count: Int, errno: Int32)

    // MARK: Sending (AsyncExactWriter; LoopMachine+Send.swift decides)

    /// Whether `send` can go zero-copy (io_uring with SEND_ZC and SENDMSG_ZC, probed when the
    /// ring is set up).
    var supportsZeroCopy: Bool { get }
    /// One send on `c` of the bytes `iov` names, in order (the machine keeps them, and the
    /// iovecs, valid until the completion), never raising SIGPIPE: one `.sent` completion
    /// follows with the bytes the kernel took (a stream socket may take fewer; the machine
    /// sends the rest) or the errno. With `zeroCopy` the kernel sends from the memory itself:
    /// the completion says whether a `.sendReleased(c, id)` follows, and until it does the
    /// memory must not change. Returns the errno when the send could not be started.
    func send(_ c: LoopConnection, _ iov: UnsafeBufferPointer<iovec>, zeroCopy: Bool, id: UInt32) -> Errno?
    /// Ends the send in flight early: its completion follows (`.canceled` when nothing went).
    func cancelSend(_ c: LoopConnection)
    /// Test seam: zero-copy notifications are held back (`true`) until released (`false`), as
    /// a kernel that keeps the memory longer would.
    func holdNotifications(_ hold: Bool)
    /// Test seam: zero-copy sends are treated as absent, as when the probe finds no SEND_ZC.
    func refuseZeroCopy()
}

/// An entry of the loop's table: what a request's token names.
enum LoopEntry {
    case connection(LoopConnection)
    case listener(Listener)
}

/// One completion, resolved to the connection or listener it belongs to.
enum LoopCompletion {
    /// Bytes a receive brought (in the shared receive buffers, or in the memory of its own it
    /// was given), and whether the receive goes on (`more`) or how it ended.
    case received(LoopConnection, ReceivedBytes?, ReceiveEnd)
    /// A read into a large body's memory: bytes (0: end of stream) or an errno.
    case read(LoopConnection, count: Int, error: Errno?)
    /// An accept: the new descriptor, or the errno that ended it.
    case accepted(Listener, Result<Int32, Errno>)
    /// A send: the bytes the kernel took, or the errno; `notification`: a zero-copy send whose
    /// `.sendReleased` follows.
    case sent(LoopConnection, count: Int, error: Errno?, notification: Bool)
    /// The kernel no longer references the memory of zero-copy send `id` (its notification).
    case sendReleased(LoopConnection, id: UInt32)
}

/// Where a receive puts what it receives.
enum ReceiveTarget {
    /// The loop's shared receive buffers (multishot where the kernel has it: the kernel picks a
    /// buffer when bytes arrive, so an idle connection holds none); `limit` > 0: the receive
    /// may end once it took that many bytes.
    case shared(limit: Int)
    /// One receive of up to `count` bytes into the connection's own memory at `offset` (a busy
    /// connection, or the shared buffers ran dry).
    case own(Region, offset: Int, count: Int)
}

/// Where received bytes are.
enum ReceivedBytes {
    /// In the loop's receive buffers (a segment that owns its buffer).
    case shared(Segment)
    /// In the connection's own memory, at `start`.
    case own(Region, start: Int, count: Int)
}

/// Whether a receive goes on after a completion, and if not, why it ended.
enum ReceiveEnd: Equatable {
    /// It is still armed: more completions will come.
    case more
    /// It ended by itself: a single-shot receive was served, or its byte limit was reached.
    case done
    case endOfStream
    /// The shared receive buffers ran dry (ENOBUFS).
    case noBuffers
    /// `disarmReceive` (or shutdown) ended it.
    case canceled
    case failed(Errno)
}

/// What a backend counts for `IOLoop.Statistics`.
struct LoopCounters {
    /// Waits in the kernel (io_uring_enter, epoll_wait).
    var enters = 0
    /// Read requests submitted (io_uring: receives armed and large reads) or read(2) calls
    /// (epoll).
    var reads = 0
    /// Completions (io_uring) or readiness events (epoll) handled.
    var completions = 0
    /// Send requests submitted (io_uring) or sendmsg(2) calls (epoll).
    var sends = 0
}
