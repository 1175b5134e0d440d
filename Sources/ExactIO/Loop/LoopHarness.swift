import SystemPackage

// The fuzz target's loop: a real `IOLoop` without a thread, its real `LoopMachine`, a real
// `AsyncExactReader` — and a scripted backend in place of the kernel. Whenever the reader
// waits, the harness runs the loop: it hands the reader's commands to the machine and asks its
// script what the kernel does next to whatever is armed (bytes arrive, split where the script
// says and interleaved with other connections' bytes in the receive buffers; the stream ends;
// a receive or a large read fails; a deadline passes; the task is cancelled; the pool runs
// low), in the order the script picks. Nothing of the product is copied here.

@_spi(Testing)
public final class LoopHarness: @unchecked Sendable {
    // @unchecked Sendable: used by one thread at a time (the caller's, then the task that runs
    // a reader call, which the caller waits for).

    /// What happens while the reader waits for received bytes.
    public enum Arrival {
        /// The next stream bytes arrive, in segments of these sizes.
        case segments([Int])
        /// The stream ends.
        case end
        /// The receive fails with this errno (after any bytes already queued).
        case error(Errno)
        /// The call's deadline passes / its task is cancelled.
        case timeout, cancel
        /// The receive pool runs low: a reader waiting with part of a frame lets its buffers go.
        case poolLow
    }

    /// What happens to a large read (a body read straight into its own memory).
    public enum LargeReadEvent {
        /// The read brings up to this many bytes.
        case progress(Int)
        case end
        case error(Errno)
        case timeout, cancel
    }

    /// Asked whenever the reader waits for received bytes (with the bytes the reader has
    /// buffered); the answer must eventually make progress, or the call would wait forever.
    public var onWait: (_ buffered: Int) -> Arrival
    public var onLargeRead: (_ capacity: Int, _ minimum: Int) -> LargeReadEvent
    /// Each segment is followed in its receive buffer by a byte of another connection (as when
    /// many connections share the provided buffers), so consecutive segments never continue
    /// each other.
    public var interleaveSegments = false

    let stream: [UInt8]
    /// Stream bytes handed to the loop so far (received or read).
    public private(set) var fed = 0
    public private(set) var ended = false

    let backend = ScriptedLoopBackend()
    private var loop: IOLoop! = nil
    private var reader: AsyncExactReader! = nil
    private var pipe: (FileDescriptor, FileDescriptor)? = nil
    /// The receive buffer being filled (segments share it).
    private var current: ReceiveBuffer? = nil
    private var currentOffset = 0
    /// The machine's clock: real time, or past every deadline while a timeout is played.
    let clock = HarnessClock()

    public init(
        stream: [UInt8], stagingCapacity: Int, maxFrameLength: Int,
        allowAllocation: (@Sendable (Int) -> Bool)? = nil,
        onWait: @escaping (Int) -> Arrival, onLargeRead: @escaping (Int, Int) -> LargeReadEvent
    ) throws {
        self.stream = stream
        self.onWait = onWait
        self.onLargeRead = onLargeRead
        let p = try FileDescriptor.pipe()
        pipe = (p.readEnd, p.writeEnd)
        loop = try IOLoop(harness: self, options: .init(receiveBufferSize: 4096, receiveBufferCount: 16))
        loop.framePool.allocationFilter = allowAllocation
        backend.free = (0..<UInt16(loop.pool.count)).reversed()
        // A deadline far away: only the script's `timeout` makes it pass.
        reader = try AsyncExactReader(
            p.readEnd, loop: loop,
            options: .init(stagingCapacity: stagingCapacity, maxFrameLength: maxFrameLength, readTimeout: .seconds(3600)))
    }

    deinit {
        reader = nil
        loop.shutDownManually()
        loop = nil
        if let (r, w) = pipe {
            try? r.close()
            try? w.close()
        }
    }


    // MARK: - The reader's calls

    public var statistics: ExactReader.Statistics { reader.statistics }
    public var bufferedCount: Int { run { $0.bufferedCount } }
    public var isAtEOF: Bool { run { $0.isAtEOF } }
    /// Segments the reader's buffer holds, and the slots of its segment array (consumed ones
    /// not yet compacted included).
    public var bufferedSegments: Int { reader.core.buffer.queue.count }
    public var segmentSlots: Int { reader.core.buffer.queue.segments.count }
    /// The first `n` buffered bytes (for traces).
    public func peek(_ n: Int) -> [UInt8] {
        (0..<min(n, reader.core.buffer.buffered)).map { reader.core.buffer.byte(at: $0) }
    }

    public func readExactly(_ count: Int) throws -> ByteView { try call { try await $0.readExactly(count) } }
    public func readFrame(prefix: LengthPrefix) throws -> ByteView? { try call { try await $0.readFrame(prefix: prefix) } }
    public func read(upTo maxCount: Int) throws -> ByteView { try call { try await $0.read(upTo: maxCount) } }
    public func skip(_ count: Int) throws { try call { try await $0.skip(count) } }
    /// `withNextFrame`, the lent bytes copied out.
    public func withNextFrame(prefix: LengthPrefix) throws -> [UInt8]? {
        try call { try await $0.withNextFrame(prefix: prefix) { span in span.withUnsafeBytes { Array($0) } } }
    }
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        nonisolated(unsafe) let buffer = buffer
        try call { try await $0.readExactly(into: buffer) }
    }

    /// A synchronous property of the reader.
    private func run<T>(_ body: (AsyncExactReader) -> T) -> T { body(reader) }

    /// Runs one reader call to its end in a task of its own (so that the script can cancel
    /// it), and waits for it. The call's waits run the loop (`runUntilNews`): it never suspends
    /// for long.
    private func call<T>(_ body: @escaping @Sendable (AsyncExactReader) async throws -> T) throws -> T {
        nonisolated(unsafe) let reader = self.reader!
        let result = Locked<Result<T, any Error>?>(nil)
        // The task runs right here, on this thread: its waits run the loop instead of
        // suspending, so it is done when `Task` returns.
        Task(executorPreference: InlineExecutor.shared) { [self] in
            let t0 = threadCPUNanoseconds()
            let r: Result<T, any Error>
            do { r = .success(try await body(reader)) } catch { r = .failure(error) }
            cpuNanoseconds += threadCPUNanoseconds() - t0
            result.withLock { $0 = r }
        }
        guard let r = result.withLock({ $0.take() }) else { preconditionFailure("a harness call suspended") }
        return try r.get()
    }

    /// CPU time the reader's calls and the loop's turns took (their task's thread).
    public private(set) var cpuNanoseconds: Int64 = 0

    // MARK: - The loop, run by a waiting reader

    /// Runs the loop until `c`'s reader has news: the machine takes the reader's commands,
    /// then the script decides what the kernel does to what is armed.
    func runUntilNews(for c: LoopConnection, cancellable: Bool, largeRead: Bool) {
        var idle = 0
        while true {
            loop.runManualTurn()
            if c.hasNews(cancellable: cancellable, largeRead: largeRead) { return }
            if backend.hasSynthetic { continue }
            if let (dst, _) = backend.pendingRead {
                playLargeRead(c, dst)
            } else if backend.armedReceive != nil {
                playReceive(c)
            } else {
                // Nothing is armed and the reader waits: buffers it starved for come back.
                idle += 1
                precondition(idle < 1000, "the harness's reader waits with nothing armed")
            }
        }
    }

    private func playReceive(_ c: LoopConnection) {
        let buffered = c.state.withLock { $0.received.bytes } + reader.core.buffer.buffered
        switch onWait(buffered) {
        case .segments(let sizes):
            arrive(sizes, c)
        case .end:
            ended = true
            backend.complete(.received(c, nil, .endOfStream))
        case .error(let e):
            backend.complete(.received(c, nil, .failed(e)))
        case .timeout:
            passDeadlines()
        case .cancel:
            withUnsafeCurrentTask { $0?.cancel() }
        case .poolLow:
            loop.pool.starved.store(true, ordering: .releasing)
        }
    }

    private func playLargeRead(_ c: LoopConnection, _ dst: UnsafeMutableRawBufferPointer) {
        let minimum = c.state.withLock { s in s.largeRead.map { max(1, $0.minimum - $0.got) } ?? 1 }
        switch onLargeRead(dst.count, minimum) {
        case .progress(let k):
            let n = min(max(k, 1), dst.count, stream.count - fed)
            if n == 0 {
                ended = true
                backend.complete(.read(c, count: 0, error: nil))
                return
            }
            stream.withUnsafeBytes { dst.baseAddress!.copyMemory(from: $0.baseAddress! + fed, byteCount: n) }
            fed += n
            if fed == stream.count { ended = true }
            backend.complete(.read(c, count: n, error: nil))
        case .end:
            ended = true
            backend.complete(.read(c, count: 0, error: nil))
        case .error(let e):
            backend.complete(.read(c, count: 0, error: e))
        case .timeout:
            passDeadlines()
        case .cancel:
            withUnsafeCurrentTask { $0?.cancel() }
        }
    }

    /// The machine's timers fire as if every deadline had passed.
    private func passDeadlines() {
        clock.pastDeadlines = true
        loop.runManualTurn()
        clock.pastDeadlines = false
    }

    /// The next stream bytes arrive for the armed receive, in segments of `sizes`, written
    /// into receive buffers the way the kernel fills provided buffers incrementally (or into
    /// the memory of its own the receive was given).
    private func arrive(_ sizes: [Int], _ c: LoopConnection) {
        if fed == stream.count {
            ended = true
            backend.complete(.received(c, nil, .endOfStream))
            return
        }
        if case .own(let region, let offset, let count)? = backend.armedReceive?.target {
            let n = min(max(sizes.first ?? 1, 1), count, stream.count - fed)
            stream.withUnsafeBytes { (region.base + offset).copyMemory(from: $0.baseAddress! + fed, byteCount: n) }
            fed += n
            backend.complete(.received(c, .own(region, start: offset, count: n), .done))
            return
        }
        for size in sizes {
            let n0 = min(max(size, 0), stream.count - fed)
            if n0 == 0 { break }
            if current == nil || loop.pool.size - currentOffset == 0 {
                guard let buffer = takeBuffer() else {
                    backend.complete(.received(c, nil, .noBuffers))
                    return
                }
                current = buffer
                currentOffset = 0
            }
            let buffer = current!
            let n = min(n0, loop.pool.size - currentOffset)
            stream.withUnsafeBytes { (buffer.base + currentOffset).copyMemory(from: $0.baseAddress! + fed, byteCount: n) }
            backend.complete(.received(c, .shared(Segment(owner: buffer, base: buffer.base, start: currentOffset, end: currentOffset + n)), .more))
            currentOffset += n
            fed += n
            if interleaveSegments { currentOffset = min(currentOffset + 1, loop.pool.size) }
            if currentOffset == loop.pool.size { current = nil }
        }
    }

    private func takeBuffer() -> ReceiveBuffer? {
        guard let bid = backend.free.popLast() else { return nil }
        // Scribble over a recycled buffer: a view that still referenced it would change.
        memset(loop.pool.address(bid), 0xA5, loop.pool.size)
        return ReceiveBuffer(pool: loop.pool, bid: bid)
    }
}

/// The harness loop's clock: real time, or past every deadline while the script plays a
/// timeout. Shared with the loop's machine, which may outlive the harness by a moment.
final class HarnessClock: @unchecked Sendable {
    // @unchecked Sendable: used by the one thread that runs the harness's calls.
    var pastDeadlines = false
    func now() -> Int64 { pastDeadlines ? Int64.max / 2 : monotonicNanoseconds() }
}

/// Runs each job at once, on the thread that enqueues it (the harness's calls never suspend).
final class InlineExecutor: TaskExecutor {
    static let shared = InlineExecutor()
    func enqueue(_ job: consuming ExecutorJob) {
        job.runSynchronously(on: asUnownedTaskExecutor())
    }
}

/// The harness's kernel: it records what the machine arms, and completes it when the harness
/// says (cancellations complete at the next turn, as on epoll).
final class ScriptedLoopBackend: LoopBackend {
    private(set) var armedReceive: (connection: LoopConnection, target: ReceiveTarget)? = nil
    private(set) var pendingRead: (dst: UnsafeMutableRawBufferPointer, slot: Int32)? = nil
    private var queued: [LoopCompletion] = []
    private var counters = LoopCounters()
    /// Receive buffers not in use (the machine gives them back here).
    var free: [UInt16] = []

    var kind: ExactReader.Backend { .posix }
    var limitsReceives: Bool { false }
    var inFlight: Int { queued.count }
    var hasSynthetic: Bool { !queued.isEmpty }

    /// Queues what the kernel did, for the next turn.
    func complete(_ completion: LoopCompletion) {
        switch completion {
        case .received(_, _, let end) where end != .more: armedReceive = nil
        case .read: pendingRead = nil
        default: break
        }
        queued.append(completion)
    }

    func armReceive(_ c: LoopConnection, _ target: ReceiveTarget) -> Errno? {
        counters.reads += 1
        armedReceive = (c, target)
        return nil
    }

    func disarmReceive(_ c: LoopConnection) {
        guard armedReceive != nil else { return }
        complete(.received(c, nil, .canceled))
    }

    func read(_ c: LoopConnection, into dst: UnsafeMutableRawBufferPointer, slot: Int32) -> Errno? {
        counters.reads += 1
        pendingRead = (dst, slot)
        return nil
    }

    func cancelRead(_ c: LoopConnection) {
        guard pendingRead != nil else { return }
        complete(.read(c, count: 0, error: .canceled))
    }

    func forget(_ c: LoopConnection) {}

    // Sending: the scripted kernel takes every send whole at the next turn (the fuzz target
    // drives readers only; writers run against the real backends in the tests).
    var supportsZeroCopy: Bool { false }
    func send(_ c: LoopConnection, _ iov: UnsafeBufferPointer<iovec>, zeroCopy: Bool, id: UInt32) -> Errno? {
        counters.sends += 1
        complete(.sent(c, count: iov.reduce(0) { $0 + $1.iov_len }, error: nil, notification: false))
        return nil
    }
    func cancelSend(_ c: LoopConnection) {}
    func holdNotifications(_ hold: Bool) {}
    func refuseZeroCopy() {}

    func accept(_ l: Listener, count: Int) -> (armed: Int, error: Errno?) { (0, .notSupported) }
    func cancelAccepts(_ l: Listener) {}
    func giveBack(_ bids: [UInt16]) { free.append(contentsOf: bids) }
    func cancelAll() {}
    func close() {}
    func injectWaitFailures(count: Int, errno: Int32) {}

    func takeCounters() -> LoopCounters {
        defer { counters = LoopCounters() }
        return counters
    }

    func turn(timeout: Int64?, resolve: (LoopToken) -> LoopEntry?, into completions: inout [LoopCompletion]) -> Errno? {
        counters.enters += 1
        counters.completions += queued.count
        completions.append(contentsOf: queued)
        queued.removeAll(keepingCapacity: true)
        return nil
    }
}
