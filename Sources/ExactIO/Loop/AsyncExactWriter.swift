import SystemPackage

// AsyncExactWriter: writing on an IOLoop (replies, relayed frames), and IOLoop.withConnection.
// The writer publishes one request at a time in its connection's send state and waits; the
// loop's machine (LoopMachine+Send.swift) sends it and says when the kernel has taken it.

/// Writes to a connected stream socket served by an `IOLoop`: views sent from their own memory
/// (a large one zero-copy where that pays), several views gathered in one `sendmsg`, copies of
/// the caller's bytes, length-prefixed frames, and a half-close.
///
/// ```swift
/// try await loop.withConnection(conn) { reader, writer in
///     for try await frame in reader.frames() {
///         try await sink.writeFrame(frame)        // relayed from the memory it landed in
///         try await writer.write(copying: ack)    // an 8-byte reply
///     }
///     try await writer.finish()
/// }
/// ```
///
/// Each call returns when the kernel has taken all of its bytes (a socket that takes part of a
/// write gets the rest as it has room; the call waits meanwhile, so a slow peer slows its writer
/// down instead of growing memory). The bytes never go out twice and never out of order.
///
/// Zero-copy: a view of at least `Options.zeroCopyThreshold` bytes goes out with io_uring's
/// `SEND_ZC` (`SENDMSG_ZC` gathered) where the kernel has it (probed when the loop's ring is
/// set up) and the socket takes it (a unix socket refuses it: the bytes then go out copying by
/// the kernel, and the writer stays with that). The kernel then sends from the view's memory,
/// which the loop keeps (the view stays referenced) until the kernel's notification that it is
/// done with it, not just until the send's completion: the memory is never reused before.
/// Those held bytes count against `Options.maxOutstandingBytes`.
///
/// Errors: a call that fails before any of its bytes went out throws the error itself (the
/// stream is as before the call): `Errno` (`.brokenPipe` after the peer closed, never SIGPIPE;
/// `.connectionReset`; `.timedOut` past `Options.writeTimeout`; `.canceled` after the loop's
/// `shutdown()`), or `CancellationError` when the awaiting task is cancelled. A call that fails
/// after part of its bytes went out throws `WriteError`, which says how many did.
///
/// A writer has one owner at a time (it is not `Sendable`); a reader of the same connection may
/// run concurrently (`IOLoop.withConnection` makes both, sharing the loop's registration).
public final class AsyncExactWriter {
    /// Writer configuration. Every field has a default.
    public struct Options: Sendable {
        /// The bound on memory the loop holds for the writer beyond the caller's own: the bytes
        /// of zero-copy sends the kernel has not released yet (a write waits while they would
        /// pass it; one write larger than the bound goes out alone), and the copy
        /// `write(copying:)` makes (at most this, and at most 256 KiB, at a time). Default
        /// 4 MiB, Linux's default TCP send buffer maximum (`net.ipv4.tcp_wmem`): what the
        /// kernel itself would hold for a socket.
        public var maxOutstandingBytes: Int
        /// How long one call may wait for the kernel to take its bytes; past it the call throws
        /// `Errno.timedOut` (or `WriteError` with it, when part went out). nil (the default):
        /// no limit.
        public var writeTimeout: Duration?
        /// Views of at least this many bytes (one piece of a write) go out zero-copy where the
        /// loop and the socket can. nil (the default): automatic, as measured on this machine
        /// (see `AsyncExactWriter.automaticZeroCopyThreshold`): 16 KiB for a peer on another
        /// host, never for a peer on this host (loopback, or one of its own addresses) or a
        /// unix socket. `Int.max`: never.
        public var zeroCopyThreshold: Int?

        /// Options with every field given or defaulted (see each field for its default).
        public init(maxOutstandingBytes: Int = 4 << 20, writeTimeout: Duration? = nil, zeroCopyThreshold: Int? = nil) {
            self.maxOutstandingBytes = maxOutstandingBytes
            self.writeTimeout = writeTimeout
            self.zeroCopyThreshold = zeroCopyThreshold
        }

        func validate() throws(ExactReader.InvalidOptionError) {
            if maxOutstandingBytes < 1 {
                throw .init(option: "maxOutstandingBytes", value: "\(maxOutstandingBytes)", requirement: ">= 1")
            }
            if let t = writeTimeout, t <= .zero {
                throw .init(option: "writeTimeout", value: "\(t)", requirement: "> 0 or nil")
            }
            if let z = zeroCopyThreshold, z < 1 {
                throw .init(option: "zeroCopyThreshold", value: "\(z)", requirement: ">= 1 or nil")
            }
        }

        /// `writeTimeout` in nanoseconds, or 0 for none.
        var timeoutNanoseconds: Int64 {
            guard let t = writeTimeout else { return 0 }
            let (s, atto) = t.components
            let ns = s.multipliedReportingOverflow(by: 1_000_000_000)
            if ns.overflow { return .max / 2 }
            return max(1, ns.partialValue.addingReportingOverflow(atto / 1_000_000_000).partialValue)
        }
    }

    /// Counters since creation.
    public struct Statistics: Sendable, Hashable {
        /// Bytes the kernel took (all of them, zero-copy or not).
        public var bytesSent = 0
        /// Of `bytesSent`, those sent zero-copy (from the views' own memory).
        public var bytesSentZeroCopy = 0
        /// Bytes the writer copied in user space: `write(copying:)`'s bytes (views are never
        /// copied; a frame's prefix is encoded, not copied).
        public var bytesCopied = 0
        /// Send requests submitted (io_uring) or `sendmsg(2)` calls (epoll).
        public var sends = 0
        /// Zero-copy sends the socket refused (sent again copying; the writer stays with that).
        public var zeroCopyRefusals = 0
        /// All counters at zero.
        public init() {}
    }

    /// A write that failed after part of its bytes went out: `sent` bytes of the call (from its
    /// start, in order) were taken by the kernel, the rest were not and never will be.
    public struct WriteError: Error, CustomStringConvertible {
        /// Bytes of the failed call that went out.
        public let sent: Int
        /// Why the rest did not: an `Errno` or `CancellationError`.
        public let underlying: any Error

        /// A failed write: `sent` bytes went out before `underlying` ended it.
        public init(sent: Int, underlying: any Error) {
            self.sent = sent
            self.underlying = underlying
        }

        public var description: String { "write failed after \(sent) bytes: \(underlying)" }
    }

    /// The zero-copy threshold `Options.zeroCopyThreshold == nil` means for a peer on another
    /// host: 16 KiB.
    ///
    /// How it was measured (`swift run -c release bench --zero-copy`, and the same C loop in
    /// `Benchmarks/ceiling/zc.c`): one TCP connection, one send in flight at a time, `SEND` vs
    /// `SEND_ZC` (and `SEND_ZC` from registered memory) at 4 KiB to 16 MiB, throughput and CPU
    /// per GiB for sender and receiver. Over loopback (kernel 6.18, the only path this machine
    /// offers), `SEND_ZC` never paid: 0.4-0.9 × the throughput of `SEND` and 1.2-2 × the CPU per
    /// byte at every size, because a receiver on the same host gets its own copy of the pinned
    /// pages anyway, and the notification costs a completion per send. So for a peer on this
    /// host the automatic threshold is "never". A peer behind a NIC gets the bytes by DMA from
    /// the pinned pages; no NIC path exists here to measure, so the figure for it is the
    /// kernel's own guidance for MSG_ZEROCOPY ("generally only effective at writes over around
    /// 10 KB"), rounded to 16 KiB. Set `Options.zeroCopyThreshold` to override it.
    public static let automaticZeroCopyThreshold = 16 << 10

    /// The descriptor written to (borrowed: never closed by the writer).
    public let fileDescriptor: FileDescriptor
    /// The loop that serves the writer.
    public let loop: IOLoop
    /// The options the writer was created with.
    public let options: Options
    /// Counters since creation.
    public private(set) var statistics = Statistics()

    let connection: LoopConnection
    let sender: LoopSender
    /// Memory for `write(copying:)`, reused while nothing else references it.
    private var staging: Region? = nil
    /// The call in progress: its deadline (CLOCK_MONOTONIC ns, 0: none) and the bytes of it
    /// that went out so far.
    private var deadline: Int64 = 0
    private var callSent = 0

    /// Creates a writer for `fd` on `loop` (the descriptor is borrowed, never closed).
    ///
    /// - Parameters:
    ///   - fd: A connected stream socket (TCP or unix), blocking or not: the loop never blocks
    ///     on it.
    ///   - loop: The loop that serves it.
    ///   - options: Outstanding-bytes bound, write timeout, zero-copy threshold.
    /// - Throws: `InvalidOptionError`; `Errno.notSocket` for a descriptor that is not a socket,
    ///   `Errno.protocolWrongTypeForSocket` for one that is not a stream; `Errno.canceled` when
    ///   the loop was shut down; the errno of the `dup` of `fd` the loop keeps.
    public convenience init(_ fd: FileDescriptor, loop: IOLoop, options: Options = Options()) throws {
        try options.validate()
        try Self.requireStreamSocket(fd)
        if loop.isStopped { throw Errno.canceled }
        let sender = LoopSender(holders: 1, zeroCopyMinimum: Self.zeroCopyMinimum(fd, options))
        let connection = LoopConnection(
            fd: try OwnedDescriptor(duplicating: fd), loop: loop, isSocket: true,
            maxBuffered: loop.options.maxBufferedBytesPerConnection, sender: sender)
        // No reader: the connection leaves the loop when the writer goes. (Set before the loop
        // has ever seen the connection.)
        connection.detached = true
        self.init(fd, loop: loop, options: options, connection: connection)
    }

    /// The writer of `connection`, whose send side exists already (a connection shared with a
    /// reader: `IOLoop.withConnection`).
    init(_ fd: FileDescriptor, loop: IOLoop, options: Options, connection: LoopConnection) {
        self.fileDescriptor = fd
        self.loop = loop
        self.options = options
        self.connection = connection
        self.sender = connection.sender!
    }

    deinit {
        sender.leave()
        loop.send(.detachSender(connection))  // the loop closes its descriptor when both are gone
    }

    // MARK: - Writing

    /// Writes the bytes of `view`, from its own memory (zero-copy when it is large enough, see
    /// the type's discussion). Returns when the kernel has taken all of them.
    public func write(_ view: ByteView) async throws {
        try await write([view])
    }

    /// Writes the bytes of `views`, in order, gathered in one `sendmsg` (up to 1,024 views and
    /// 1 GiB per send; a socket that takes part gets the rest in further sends). Returns when
    /// the kernel has taken all of them.
    public func write(_ views: [ByteView]) async throws {
        var total = 0
        for v in views { total += v.count }
        guard total > 0 else { return }
        let mayPin = views.contains { $0.count >= sender.zeroCopyMinimum }
        try await call {
            try await transmit(views, total: total, zeroCopy: true, mayPin: mayPin)
        }
    }

    /// Writes a copy of `bytes` (the kernel copies them again into the socket; at most
    /// `min(maxOutstandingBytes, 256 KiB)` are copied at a time, so the writer's memory stays
    /// bounded whatever the size). `bytes` must stay valid until the call returns.
    public func write(copying bytes: UnsafeRawBufferPointer) async throws {
        guard bytes.count > 0, let base = bytes.baseAddress else { return }
        let count = bytes.count
        try await call {
            var offset = 0
            while offset < count {
                let n = min(count - offset, copyChunk)
                let region = try stagingRegion(n)
                region.base.copyMemory(from: base + offset, byteCount: n)
                statistics.bytesCopied += n
                try await transmit([staged(region, n)], total: n, zeroCopy: false, mayPin: false)
                offset += n
            }
        }
    }

    /// Writes a copy of `bytes` (as `write(copying:)` for a buffer: in bounded pieces).
    public func write(copying bytes: some Sequence<UInt8>) async throws {
        if let count = bytes.withContiguousStorageIfAvailable({ $0.count }) {
            guard count > 0 else { return }
            try await call {
                var offset = 0
                while offset < count {
                    let n = min(count - offset, copyChunk)
                    let region = try stagingRegion(n)
                    _ = bytes.withContiguousStorageIfAvailable { src in
                        region.base.copyMemory(from: src.baseAddress! + offset, byteCount: n)
                    }
                    statistics.bytesCopied += n
                    try await transmit([staged(region, n)], total: n, zeroCopy: false, mayPin: false)
                    offset += n
                }
            }
            return
        }
        var iterator = bytes.makeIterator()
        var next = iterator.next()
        guard next != nil else { return }
        try await call {
            while next != nil {
                let region = try stagingRegion(copyChunk)
                var n = 0
                while n < copyChunk, let byte = next {
                    region.base.storeBytes(of: byte, toByteOffset: n, as: UInt8.self)
                    n += 1
                    next = iterator.next()
                }
                statistics.bytesCopied += n
                try await transmit([staged(region, n)], total: n, zeroCopy: false, mayPin: false)
            }
        }
    }

    /// Writes one length-prefixed frame: `prefix` (the body's length, as `readFrame(prefix:)`
    /// reads it) and `body` gathered in one `sendmsg`, the body from its own memory (no copy).
    ///
    /// - Throws: `Errno.messageTooLong` when the body's length does not fit `prefix` (nothing
    ///   is sent); otherwise as `write(_:)`.
    public func writeFrame(_ body: ByteView, prefix: LengthPrefix = .uint32(.bigEndian)) async throws {
        let header = try Self.encode(length: body.count, prefix)
        let head = try header.withUnsafeBytes { raw throws(Errno) in try ByteView(copying: raw) }
        try await write([head, body])
    }

    /// Half-closes the connection (`shutdown(SHUT_WR)`): the peer reads the end of the stream
    /// once it has read everything written before; this side may still read. Writes after it
    /// fail with `Errno.brokenPipe`.
    public func finish() async throws {
        guard shutdown(connection.fd.rawValue, Int32(SHUT_WR)) == 0 else { throw Errno(rawValue: errno) }
    }

    // MARK: - One call

    /// `write(copying:)` copies at most this much at a time.
    private var copyChunk: Int { min(options.maxOutstandingBytes, 256 << 10) }

    /// Runs one call: its deadline, and the error it throws (with what went out, if anything).
    private func call(_ body: () async throws -> Void) async throws {
        let timeout = options.timeoutNanoseconds
        deadline = timeout > 0 ? monotonicNanoseconds() + timeout : 0
        callSent = 0
        defer {
            if deadline > 0 {
                // The call is over: its deadline, and a timeout the loop flagged for it, go.
                sender.shared.withLock { s in
                    s.deadline = 0
                    s.timedOut = false
                }
            }
            deadline = 0
        }
        do {
            try await body()
        } catch {
            if callSent == 0 { throw error }
            throw WriteError(sent: callSent, underlying: error)
        }
    }

    /// One request to the loop: waits for room (the outstanding bound), publishes the request,
    /// and waits until the loop says the kernel took it all, or why not. A cancelled task, a
    /// deadline or a shutdown ends the send in flight; the call returns only once the kernel is
    /// done with the views' memory as far as the send goes (a zero-copy send's memory stays
    /// held by the loop until its notification).
    private func transmit(_ views: [ByteView], total: Int, zeroCopy: Bool, mayPin: Bool) async throws {
        if mayPin { try await waitForRoom(total) }
        let shutDown = sender.shared.withLock { s -> Bool in
            if s.shutDown || s.failure != nil { return true }
            s.request = SendRequest(views: views, total: total, zeroCopyAllowed: zeroCopy)
            s.deadline = deadline
            return false
        }
        if shutDown { throw sender.shared.withLock { $0.failure } ?? Errno.canceled }
        loop.send(.send(connection))
        var cancelSent = false
        while true {
            await sender.wait(cancellable: !cancelSent) { s in
                (s.request?.done ?? true) || (!cancelSent && (s.shutDown || s.timedOut || s.failure != nil))
            }
            let (done, interrupted) = sender.shared.withLock { s in
                (s.request?.done ?? true, s.shutDown || s.timedOut || s.failure != nil)
            }
            if done { break }
            if !cancelSent && (Task.isCancelled || interrupted) {
                loop.send(.cancelSend(connection))
                cancelSent = true
            }
        }
        let (r, timedOut, stopped, failure) = sender.shared.withLock { s in
            let r = s.request
            s.request = nil
            return (r, s.timedOut, s.shutDown, s.failure)
        }
        guard let r else { throw Errno.canceled }
        statistics.bytesSent += r.sent
        statistics.bytesSentZeroCopy += r.sentZeroCopy
        statistics.sends += r.sends
        statistics.zeroCopyRefusals += r.refusals
        callSent += r.sent
        if r.sent >= r.total { return }
        if let e = r.error, e != .canceled { throw e }
        if let failure { throw failure }
        if timedOut { throw Errno.timedOut }
        if stopped { throw Errno.canceled }
        if cancelSent || Task.isCancelled { throw CancellationError() }
        throw r.error ?? Errno.ioError
    }

    /// Waits while the loop holds zero-copy bytes of this writer's earlier writes and `total`
    /// more would pass `maxOutstandingBytes` (a write larger than the bound goes out once
    /// nothing is held).
    private func waitForRoom(_ total: Int) async throws {
        let bound = options.maxOutstandingBytes
        func room(_ s: LoopSender.Shared) -> Bool { s.pinned == 0 || s.pinned + total <= bound }
        if sender.shared.withLock({ room($0) }) { return }
        if deadline > 0 {
            sender.shared.withLock { $0.deadline = deadline }
            loop.send(.sendDeadline(connection))
        }
        while true {
            await sender.wait(cancellable: true) { s in room(s) || s.shutDown || s.timedOut || s.failure != nil }
            let (ok, timedOut, stopped, failure) = sender.shared.withLock { s in (room(s), s.timedOut, s.shutDown, s.failure) }
            if ok { return }
            if let failure { throw failure }
            if stopped { throw Errno.canceled }
            if timedOut { throw Errno.timedOut }
            try Task.checkCancellation()
            if deadline > 0 && monotonicNanoseconds() >= deadline { throw Errno.timedOut }
        }
    }

    // MARK: - Helpers

    /// Memory for `n` bytes of a copy: the writer's staging region when nothing else references
    /// it any more (the send that used it is over), else a new one.
    private func stagingRegion(_ n: Int) throws(Errno) -> Region {
        if var region = staging {
            staging = nil
            if isKnownUniquelyReferenced(&region) && region.capacity >= n {
                staging = region
                return region
            }
        }
        let region = try Region.standalone(capacity: max(n, 64))
        staging = region
        return region
    }

    /// A view of the first `n` bytes of the staging region (internal: never handed out).
    private func staged(_ region: Region, _ n: Int) -> ByteView {
        ByteView(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: n), owner: region)
    }

    static func requireStreamSocket(_ fd: FileDescriptor) throws {
        let type = try BackendSelection.fileType(fd)
        if type != S_IFSOCK { throw Errno.notSocket }
        try BackendSelection.requireStreamSocket(fd)
    }

    /// The zero-copy minimum for a writer on `fd`: the option, or automatic (see
    /// `automaticZeroCopyThreshold`): never for a unix socket or a peer on this host.
    static func zeroCopyMinimum(_ fd: FileDescriptor, _ options: Options) -> Int {
        if let t = options.zeroCopyThreshold { return t }
        return peerIsRemote(fd) ? automaticZeroCopyThreshold : .max
    }

    /// Whether `fd`'s peer is on another host: an IPv4 or IPv6 peer that is neither a loopback
    /// address nor the connection's own local address.
    static func peerIsRemote(_ fd: FileDescriptor) -> Bool {
        var local = sockaddr_storage()
        var peer = sockaddr_storage()
        var localLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        var peerLength = localLength
        let ok = withUnsafeMutablePointer(to: &local) { l in
            withUnsafeMutablePointer(to: &peer) { p in
                l.withMemoryRebound(to: sockaddr.self, capacity: 1) { ls in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { ps in
                        getsockname(fd.rawValue, ls, &localLength) == 0 && getpeername(fd.rawValue, ps, &peerLength) == 0
                    }
                }
            }
        }
        guard ok, local.ss_family == peer.ss_family else { return false }
        switch Int32(peer.ss_family) {
        case AF_INET:
            let (l, p) = withUnsafeBytes(of: &local) { lb in
                withUnsafeBytes(of: &peer) { pb in
                    (lb.load(as: sockaddr_in.self).sin_addr.s_addr, pb.load(as: sockaddr_in.self).sin_addr.s_addr)
                }
            }
            let host = UInt32(bigEndian: p)
            return host >> 24 != 127 && l != p
        case AF_INET6:
            let (l, p) = withUnsafeBytes(of: &local) { lb in
                withUnsafeBytes(of: &peer) { pb in
                    (Array(UnsafeRawBufferPointer(rebasing: lb[8..<24])), Array(UnsafeRawBufferPointer(rebasing: pb[8..<24])))
                }
            }
            let loopback6 = [UInt8](repeating: 0, count: 15) + [1]
            let mappedLoopback = [UInt8](repeating: 0, count: 10) + [0xff, 0xff, 127]
            return p != loopback6 && Array(p.prefix(13)) != mappedLoopback && l != p
        default:
            return false
        }
    }

    /// The bytes of `length` as `prefix` encodes it.
    static func encode(length: Int, _ prefix: LengthPrefix) throws(Errno) -> [UInt8] {
        let n = UInt64(length)
        func fixed(_ width: Int, _ order: LengthPrefix.Endianness) throws(Errno) -> [UInt8] {
            if width < 8 && n >> UInt64(width * 8) != 0 { throw .messageTooLong }
            let be = (0..<width).map { UInt8(truncatingIfNeeded: n >> UInt64((width - 1 - $0) * 8)) }
            return order == .bigEndian ? be : be.reversed()
        }
        switch prefix {
        case .uint8: return try fixed(1, .bigEndian)
        case .uint16(let order): return try fixed(2, order)
        case .uint32(let order): return try fixed(4, order)
        case .uint64(let order): return try fixed(8, order)
        case .varint:
            var out: [UInt8] = []
            var v = n
            repeat {
                let low = UInt8(v & 0x7f)
                v >>= 7
                out.append(v == 0 ? low : low | 0x80)
            } while v != 0
            return out
        }
    }
}

// MARK: - Scoped connections

extension IOLoop {
    /// Runs `body` with a reader and a writer of the connection `fd`, then closes it: the loop
    /// ends whatever the two still have in the kernel and closes its descriptor (awaited), then
    /// `fd` is closed, whether `body` returned or threw (as `NIOAsyncChannel.executeThenClose`
    /// scopes a channel). The reader and the writer share one registration with the loop (and
    /// one duplicate of the descriptor); they may run concurrently (for example the writer in a
    /// child task).
    ///
    /// ```swift
    /// for try await conn in loop.connections(accepting: listener) {
    ///     group.addTask {
    ///         try? await loop.withConnection(conn) { reader, writer in
    ///             for try await frame in reader.frames() {
    ///                 try await writer.write(copying: ack(frame))
    ///             }
    ///         }
    ///     }
    /// }
    /// ```
    ///
    /// `withConnection` owns `fd`: it is closed in every case (also when the reader or the
    /// writer cannot be created); do not close it yourself, and do not use the reader or the
    /// writer after `body` returns.
    ///
    /// - Returns: What `body` returns.
    /// - Throws: What `body` throws; the errors of `AsyncExactReader.init` and
    ///   `AsyncExactWriter.init` (`fd` must be a connected stream socket).
    public func withConnection<R>(
        _ fd: FileDescriptor,
        readerOptions: ExactReader.Options = ExactReader.Options(),
        writerOptions: AsyncExactWriter.Options = AsyncExactWriter.Options(),
        isolation: isolated (any Actor)? = #isolation,
        _ body: (AsyncExactReader, AsyncExactWriter) async throws -> R
    ) async throws -> R {
        let reader: AsyncExactReader
        let writer: AsyncExactWriter
        do {
            try writerOptions.validate()
            try AsyncExactWriter.requireStreamSocket(fd)
            let sender = LoopSender(holders: 2, zeroCopyMinimum: AsyncExactWriter.zeroCopyMinimum(fd, writerOptions))
            reader = try AsyncExactReader(fd, loop: self, options: readerOptions, sender: sender)
            writer = AsyncExactWriter(fd, loop: self, options: writerOptions, connection: reader.connection)
        } catch {
            try? fd.close()
            throw error
        }
        let result: Result<R, any Error>
        do {
            result = .success(try await body(reader, writer))
        } catch {
            result = .failure(error)
        }
        let connection = reader.connection
        await withCheckedContinuation { (k: CheckedContinuation<Void, Never>) in
            send(.closeConnection(connection, k))
        }
        try? fd.close()
        return try result.get()
    }
}
