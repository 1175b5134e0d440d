import Logging
import Synchronization
import SystemPackage

// IOLoop: the loop's thread, its inbox of commands and jobs (it is a TaskExecutor too),
// statistics and shutdown. The decisions are LoopMachine's; the kernel is a LoopBackend's.

/// One thread that serves any number of connections: one io_uring ring (provided-buffer
/// receive, multishot, one `io_uring_enter` per turn for every submission and completion), or
/// readiness with non-blocking `read(2)` where io_uring is unavailable: epoll on Linux,
/// `poll(2)` elsewhere (see `Options.events`).
///
/// ```swift
/// let loop = try IOLoop()
/// for try await conn in loop.connections(accepting: listener) {
///     Task {
///         defer { try? conn.close() }
///         let reader = try AsyncExactReader(conn, loop: loop)
///         for try await frame in reader.frames() { handle(frame) }
///     }
/// }
/// ```
///
/// A loop is `Sendable` and shared by many tasks; each `AsyncExactReader` has one owner. Idle
/// connections hold no receive memory: the loop's receive buffers (a fixed pool, shared) are
/// taken when data arrives and given back when the last view of their bytes is released.
///
/// The loop is also a `TaskExecutor`: inside `withTaskExecutorPreference(loop) { … }`, a
/// connection handler runs on the loop's thread, and the code that consumes a completion runs
/// right after it, with no thread hop.
///
/// Scaling: one loop per core. With `SO_REUSEPORT`, give each loop a listener of its own on the
/// same port and let the kernel spread connections (see `IOLoopGroup`).
public final class IOLoop: @unchecked Sendable {
    // @unchecked Sendable: the fields below are immutable, atomic, or behind `inbox`'s mutex;
    // `driver`, `entries` and the per-connection loop fields are touched only on the loop's
    // thread.

    /// Loop configuration. Every field has a default.
    public struct Options: Sendable {
        /// `.automatic` (io_uring, else readiness), `.ioUring` (or the initializer throws), or
        /// `.posix` (readiness with `read(2)`: the interface `events` names). `EXACTIO_BACKEND`
        /// overrides `.automatic`, as for `ExactReader`.
        public var backend: ExactReader.Backend
        /// Bytes of each receive buffer (4 KiB to 1 MiB, rounded up to a power of two); default
        /// 64 KiB. Small frames inside one buffer are views of it; a frame that spans two is
        /// copied once. Larger buffers mean larger receives (less kernel work per byte: 2.03 GB/s
        /// at 64 KiB against 1.77 at 16 KiB, 256 connections × 4 KiB over TCP here) and fewer
        /// spanning frames; a kept view holds its whole buffer out of the pool, though.
        public var receiveBufferSize: Int
        /// Receive buffers shared by the loop's connections (a power of two, 16 to 32,768);
        /// default 256. With `receiveBufferSize`, the loop's receive memory: 256 × 64 KiB =
        /// 16 MiB by default, committed only as the kernel writes into it.
        public var receiveBufferCount: Int
        /// Backpressure: a connection whose received, unread bytes reach this stops receiving
        /// until its reader takes them. What counts is the memory the bytes hold: their count
        /// plus the bookkeeping of each received segment (a peer sending a byte at a time
        /// cannot make a connection hold more than this). Default 256 KiB.
        public var maxBufferedBytesPerConnection: Int
        /// Accepted connections that `connections(accepting:)` may hold for a consumer that has
        /// not taken them: past it, accepting pauses (further connections wait in the kernel's
        /// listen backlog) until the consumer catches up. Default 1,024.
        public var maxPendingConnections: Int
        /// The readiness interface the loop waits with when it does not run on io_uring:
        /// `.automatic` (epoll on Linux, `poll(2)` elsewhere; `EXACTIO_EVENTS` overrides it),
        /// `.epoll` (Linux only), or `.poll`. Default `.automatic`.
        public var events: EventInterface
        /// A logger for what operators may want to see of the loop, all at `debug`: its start
        /// (backend, fallback reason, receive memory) and end (its counters), a start that
        /// failed, a listener that fails for good (its accept sequence throws the error), and
        /// each accept pause for a shortage of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
        /// ENOMEM) with its length. One event only is logged at `error`: the kernel interface
        /// failing for good (an `io_uring_enter` or `epoll_wait` error that is not a passing
        /// one), which fails every reader of the loop. Nothing per connection or per frame
        /// (readers log through their own `ExactReader.Options.logger`). Nil (the default) logs
        /// nothing.
        public var logger: Logger?

        /// Options with every field given or defaulted (see each field for its default).
        public init(
            backend: ExactReader.Backend = .automatic,
            receiveBufferSize: Int = 64 << 10,
            receiveBufferCount: Int = 256,
            maxBufferedBytesPerConnection: Int = 256 << 10,
            maxPendingConnections: Int = 1024,
            events: EventInterface = .automatic,
            logger: Logger? = nil
        ) {
            self.backend = backend
            self.receiveBufferSize = receiveBufferSize
            self.receiveBufferCount = receiveBufferCount
            self.maxBufferedBytesPerConnection = maxBufferedBytesPerConnection
            self.maxPendingConnections = maxPendingConnections
            self.events = events
            self.logger = logger
        }

        func validate() throws(ExactReader.InvalidOptionError) {
            if receiveBufferSize < 4096 || receiveBufferSize > 1 << 20 {
                throw .init(option: "receiveBufferSize", value: "\(receiveBufferSize)", requirement: "between 4096 and 1048576")
            }
            if receiveBufferCount < 16 || receiveBufferCount > 32768 {
                throw .init(option: "receiveBufferCount", value: "\(receiveBufferCount)", requirement: "between 16 and 32768")
            }
            if maxBufferedBytesPerConnection < 1 {
                throw .init(
                    option: "maxBufferedBytesPerConnection", value: "\(maxBufferedBytesPerConnection)", requirement: ">= 1")
            }
            if maxPendingConnections < 1 {
                throw .init(option: "maxPendingConnections", value: "\(maxPendingConnections)", requirement: ">= 1")
            }
            if !events.isAvailable {
                throw .init(option: "events", value: "\(events)", requirement: "automatic or poll on this platform (epoll is Linux's)")
            }
        }
    }

    /// Counters since the loop started (the loop's own, across its connections).
    public struct Statistics: Sendable, Hashable {
        /// Waits in the kernel: `io_uring_enter`, `epoll_wait` or `poll` calls.
        public var enters = 0
        /// Read requests submitted (io_uring: receives armed and large reads) or `read(2)`
        /// calls (epoll).
        public var reads = 0
        /// Completions (io_uring) or readiness events (epoll, poll) handled.
        public var completions = 0
        /// Times another thread woke the loop (a write to its eventfd or wakeup pipe).
        public var wakeups = 0
        /// Receives that found the buffer pool empty and waited for buffers to come back.
        public var starvations = 0
        /// Send requests submitted (io_uring) or `sendmsg(2)` calls (epoll), for every
        /// `AsyncExactWriter` on the loop.
        public var sends = 0
        /// All counters at zero.
        public init() {}
    }

    /// The public counters and the loop's internal ones (for tests: the work a turn costs).
    struct Counts: Sendable {
        var statistics = Statistics()
        /// Loop turns (a turn may or may not wait in the kernel).
        var turns = 0
        /// Timer entries looked at when firing timers: a turn must not cost work in
        /// proportion to the deadlines idle readers have armed.
        var timersExamined = 0
        /// Timer entries in the heap after the turn (stale ones included).
        var timersHeld = 0
    }

    /// The backend in use after any fallback: `.ioUring` or `.posix` (readiness: see
    /// `eventInterface`).
    public private(set) var backend: ExactReader.Backend = .posix
    /// Why io_uring is not used, if it is not (as for `ExactReader.fallbackReason`).
    public private(set) var fallbackReason: String? = nil
    /// The options the loop was created with.
    public let options: Options

    let pool: ReceivePool
    /// Frame memory for large bodies, shared by the loop's readers (unregistered: registration
    /// would have to happen on the loop's thread).
    let framePool: MemoryPool
    let waker: Waker
    /// The readiness interface for when io_uring is not used (`Options.events` after
    /// `EXACTIO_EVENTS`), and why the variable was ignored, if it was.
    let readiness: (interface: EventInterface, note: String?)
    /// Created on the loop's thread (a SINGLE_ISSUER ring belongs to the thread that creates it).
    private var driver: (any LoopDriving)! = nil
    /// Set for a loop without a thread, run by the fuzz harness (`LoopHarness`).
    private(set) weak var manual: LoopHarness? = nil
    private let inbox = Locked(Inbox())
    private let sleeping = Atomic<Bool>(false)
    private let stats = Locked(Counts())
    /// The loop thread's own counters, published to `stats` once per turn.
    private var localStats = Counts()
    /// Receive buffers given back, as the loop's thread takes them (see
    /// `ReceivePool.takeReturned(into:)`).
    private var returnedBuffers: [UInt16] = []
    private let wakeups = Atomic<Int>(0)
    private let loopThreadID = Atomic<UInt>(0)
    private var thread: pthread_t? = nil
    /// Set once shutdown has begun: new work is refused, jobs go to the global executor.
    private let stopped = Atomic<Bool>(false)
    private let joined = Locked(false)

    struct Inbox {
        var commands: [LoopCommand] = []
        var jobs: [UnownedJob] = []
        /// The thread has ended: jobs go to the global executor.
        var exited = false
    }

    /// Creates a loop and starts its thread.
    ///
    /// - Throws: `InvalidOptionError`; `Errno` when the eventfd (or wakeup pipe), the receive
    ///   memory or the thread cannot be created, or `.ioUring` was demanded and is unavailable.
    public init(options: Options = Options()) throws {
        try options.validate()
        self.options = options
        var size = 4096
        while size < options.receiveBufferSize { size <<= 1 }
        var count = 16
        while count < options.receiveBufferCount { count <<= 1 }
        self.readiness = EventInterface.resolveFromProcess(options.events)
        let waker = try Waker(kind: readiness.interface.wakerKind)
        self.waker = waker
        self.pool = try ReceivePool(count: count, size: size, wake: { waker.wake() })
        returnedBuffers.reserveCapacity(count)
        self.framePool = MemoryPool(registrar: nil, registrationLimit: nil)
        do {
            try start()
        } catch {
            options.logger?.debug("ExactIO loop could not start", metadata: ["exactio.error": "\(error)"])
            throw error
        }
        options.logger?.debug(
            "ExactIO loop started",
            metadata: [
                "exactio.backend": "\(backend)",
                "exactio.fallback": "\(fallbackReason ?? "none")",
                "exactio.receive_buffer_bytes": "\(size)",
                "exactio.receive_buffers": "\(count)",
            ])
    }

    /// A loop without a thread, whose machine runs a scripted backend when `harness` says (the
    /// fuzz target: `LoopHarness`).
    init(harness: LoopHarness, options: Options) throws {
        try options.validate()
        self.options = options
        self.readiness = (EventInterface.epoll, nil)
        let waker = try Waker()
        self.waker = waker
        self.pool = try ReceivePool(count: max(16, options.receiveBufferCount), size: max(4096, options.receiveBufferSize), wake: {})
        returnedBuffers.reserveCapacity(pool.count)
        self.framePool = MemoryPool(registrar: nil, registrationLimit: nil)
        self.manual = harness
        let count: ((inout Counts) -> Void) -> Void = { [unowned self] body in self.count(body) }
        driver = LoopMachine(backend: harness.backend, pool: pool, framePool: framePool, waker: waker, now: { [clock = harness.clock] in clock.now() }, count: count)
        backend = .posix
    }

    /// One turn of a loop without a thread: the commands sent so far, buffers given back, and
    /// the completions its backend has.
    func runManualTurn() {
        let commands = inbox.withLock { box -> [LoopCommand] in
            defer { box.commands.removeAll(keepingCapacity: true) }
            return box.commands
        }
        for command in commands { driver.handle(command) }
        pool.takeReturned(into: &returnedBuffers)
        driver.giveBack(returnedBuffers)
        driver.turn(block: false)
    }

    /// Ends a loop without a thread: its machine lets go of every connection.
    func shutDownManually() {
        runManualTurn()
        driver.beginShutdown()
        for _ in 0..<100 where !driver.isDrained { runManualTurn() }
        driver.finishShutdown()
    }

    /// The loop's machine over the backend `options` ask for (after `EXACTIO_BACKEND`), and why
    /// io_uring is not used, if it is not. On the loop's thread.
    func makeDriver() throws -> (any LoopDriving, String?) {
        let (wanted, forced, note) = BackendSelection.resolve(options.backend, environment: ExactReader.processEnvironment())
        let count: ((inout Counts) -> Void) -> Void = { [unowned self] body in self.count(body) }
        func readinessDriver(_ reason: String?) throws -> (any LoopDriving, String?) {
            let why = [reason, readiness.note].compactMap { $0 }
            return (try makeReadinessDriver(count: count), why.isEmpty ? nil : why.joined(separator: "; "))
        }
        if wanted == .posix { return try readinessDriver(forced.map { "io_uring not used: forced by \($0)" }) }
        #if EXACTIO_URING
        switch URingLoopBackend.make(pool: pool, waker: waker) {
        case .success(let backend):
            return (makeMachine(backend, count: count), note)
        case .failure(let failure):
            if wanted == .ioUring { throw failure.errno }
            return try readinessDriver([note, failure.reason].compactMap { $0 }.joined(separator: "; "))
        }
        #else
        if wanted == .ioUring { throw Errno.notSupported }
        return try readinessDriver([note, "io_uring not used: this build of ExactIO leaves it out (the IOUring trait is off, EXACTIO_NO_URING=1, or not Linux)"]
            .compactMap { $0 }.joined(separator: "; "))
        #endif
    }

    /// Starts the thread, which creates the backend (a SINGLE_ISSUER ring must be created and
    /// registered on by the thread that submits to it), and waits for the outcome.
    private func start() throws {
        let context = StartContext(loop: self)
        let tid = try Platform.spawnThread {
            let loop = context.loop
            do {
                let (driver, reason) = try loop.makeDriver()
                loop.driver = driver
                loop.backend = driver.kind
                loop.fallbackReason = reason
                context.started.withLock { $0 = .success(()) }
            } catch {
                context.started.withLock { $0 = .failure(error) }
                return
            }
            loop.run()
        }
        // The outcome comes within the time it takes to set a ring up.
        while true {
            if let outcome = context.started.withLock({ $0 }) {
                if case .failure(let e) = outcome {
                    pthread_join(tid, nil)
                    stopped.store(true, ordering: .releasing)
                    throw e
                }
                break
            }
            usleep(50)
        }
        thread = tid
    }

    /// What the new thread needs, and how it reports back whether the backend came up.
    private final class StartContext: @unchecked Sendable {
        // @unchecked Sendable: handed to the new thread once; `started` is a mutex.
        let loop: IOLoop
        let started = Locked<Result<Void, any Error>?>(nil)
        init(loop: IOLoop) { self.loop = loop }
    }

    deinit {
        // A loop is released only after its thread ended (the thread holds it while it runs),
        // and the thread closed the ring or epoll set itself.
        waker.close()
    }

    /// The loop's counters.
    public var statistics: Statistics {
        var s = stats.withLock { $0.statistics }
        s.wakeups = wakeups.load(ordering: .relaxed)
        return s
    }

    /// The loop's internal work counters (tests): turns, timer entries looked at, and held.
    var work: (turns: Int, timersExamined: Int, timersHeld: Int) {
        stats.withLock { ($0.turns, $0.timersExamined, $0.timersHeld) }
    }

    /// Counts on the loop's thread (published once per turn).
    @inline(__always)
    func count(_ body: (inout Counts) -> Void) {
        body(&localStats)
    }

    // MARK: - Shutdown

    /// Stops the loop: every pending read fails (`Errno.canceled`), every request is cancelled
    /// and drained, accept sequences end, the thread is joined, and the ring (or epoll set),
    /// the receive memory and the eventfd are released. Readers of this loop fail from then on.
    /// Calling it again does nothing.
    public func shutdown() async {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else {
            await waitJoined()
            return
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            send(.shutdown(c))
        }
        await waitJoined()
        if let logger = options.logger {
            let s = statistics
            logger.debug(
                "ExactIO loop shut down",
                metadata: [
                    "exactio.enters": "\(s.enters)", "exactio.reads": "\(s.reads)",
                    "exactio.completions": "\(s.completions)", "exactio.wakeups": "\(s.wakeups)",
                    "exactio.starvations": "\(s.starvations)",
                ])
        }
    }

    private func waitJoined() async {
        // The thread resumed the continuation as its last act; joining takes a moment.
        let toJoin: pthread_t? = joined.withLock { done in
            if done { return nil }
            done = true
            return thread
        }
        if let t = toJoin { pthread_join(t, nil) }
    }

    var isStopped: Bool { stopped.load(ordering: .acquiring) }

    /// A summary of every connection's and listener's state, for debugging hangs: taken on the
    /// loop's thread (a command; the caller waits for it), or, when the thread does not answer
    /// within `timeoutMilliseconds`, what other threads may read (the pool's counters) with a
    /// note that it did not. Never call it on the loop's thread.
    @_spi(Testing)
    public func debugState(timeoutMilliseconds: Int = 2000) -> String {
        let pool = "pool outstanding \(pool.outstanding.load(ordering: .relaxed)) of \(pool.count), starved \(pool.starved.load(ordering: .relaxed))"
        if isLoopThread { return "(debugState called on the loop's thread)\n" + pool }
        let answer = Locked<String?>(nil)
        send(.inspect { text in answer.withLock { $0 = text } })
        for _ in 0..<max(1, timeoutMilliseconds) {
            if let text = answer.withLock({ $0 }) { return text + "\n" + pool }
            usleep(1000)
        }
        return "(the loop's thread did not answer within \(timeoutMilliseconds) ms)\n" + pool
    }

    /// Test seam: the loop's next `count` waits in the kernel fail with `errno` (io_uring).
    @_spi(Testing)
    public func injectWaitFailures(count: Int, errno: Int32) {
        send(.injectFailures(count: count, errno: errno))
    }

    /// Test seam: the loop's zero-copy notifications are held back while `hold` is true (and
    /// delivered when it is set back to false), as if the kernel kept the memory longer: the
    /// views of zero-copy sends must stay held meanwhile. io_uring only.
    @_spi(Testing)
    public func holdZeroCopyNotifications(_ hold: Bool) {
        send(.holdNotifications(hold))
    }

    /// Test seam: the loop treats zero-copy sends as absent from then on (as when the probe at
    /// ring setup finds no SEND_ZC).
    @_spi(Testing)
    public func refuseZeroCopy() {
        send(.refuseZeroCopy)
    }

    /// The loop's thread (for tests that signal it).
    var threadHandle: pthread_t? { thread }

    // MARK: - Commands and wakeups

    /// Queues `command` for the loop's thread and wakes it if it sleeps.
    func send(_ command: LoopCommand) {
        let queued = inbox.withLock { box -> Bool in
            if box.exited { return false }
            box.commands.append(command)
            return true
        }
        if queued {
            wake()
            return
        }
        IOLoop.answerAfterExit(command)
    }

    /// Answers `command` as a loop whose thread has ended (every request drained, the ring or
    /// epoll set closed) would.
    static func answerAfterExit(_ command: LoopCommand) {
        switch command {
        case .receive(let c), .deadline(let c):
            c.interrupt(shutDown: true)
        case .largeRead(let c), .cancelLargeRead(let c):
            c.largeReadProgress(0, finished: true, error: .canceled)
            c.interrupt(shutDown: true)
        case .detach(let c):
            // A connection with a writer closes when the last of its reader and writer goes.
            if c.sender?.everyoneLeft ?? true { c.fd.close() }
        case .listen(let l):
            l.queue.finish()
            l.fd.close()
        case .send(let c):
            c.sender?.wake { s in
                s.shutDown = true
                if s.request != nil && !s.request!.done {
                    s.request!.done = true
                    s.request!.error = .canceled
                }
            }
        case .detachSender(let c):
            if c.sender?.everyoneLeft ?? true { c.fd.close() }
        case .closeConnection(let c, let k):
            c.fd.close()
            k.resume()
        case .unlisten, .resumeAccept, .injectFailures, .cancelSend, .sendDeadline, .holdNotifications, .refuseZeroCopy:
            break
        case .inspect(let reply):
            reply("(the loop has shut down)")
        case .shutdown(let c):
            c.resume()
        }
    }

    var isLoopThread: Bool {
        loopThreadID.load(ordering: .relaxed) == UInt(bitPattern: Int(bitPattern: pthread_self()))
    }

    private func wake() {
        if isLoopThread { return }
        if sleeping.load(ordering: .acquiring) {
            waker.wake()
            wakeups.add(1, ordering: .relaxed)
        }
    }

    // MARK: - The thread

    private func run() {
        loopThreadID.store(UInt(bitPattern: Int(bitPattern: pthread_self())), ordering: .relaxed)
        var shutdownWaiter: CheckedContinuation<Void, Never>? = nil
        while true {
            let (commands, jobs) = inbox.withLock { box -> ([LoopCommand], [UnownedJob]) in
                let c = box.commands
                let j = box.jobs
                box.commands.removeAll(keepingCapacity: true)
                box.jobs.removeAll(keepingCapacity: true)
                return (c, j)
            }
            for command in commands {
                if case .shutdown(let c) = command {
                    shutdownWaiter = c
                    driver.beginShutdown()
                } else {
                    driver.handle(command)
                }
            }
            pool.takeReturned(into: &returnedBuffers)
            driver.giveBack(returnedBuffers)
            for job in jobs { job.runSynchronously(on: asUnownedTaskExecutor()) }
            if shutdownWaiter != nil && driver.isDrained { break }

            // Sleep only when nothing is queued: the flag is set before the last look, so an
            // enqueue after that look sees it and writes the eventfd.
            sleeping.store(true, ordering: .sequentiallyConsistent)
            let idle = inbox.withLock { $0.commands.isEmpty && $0.jobs.isEmpty }
            let block = idle && shutdownWaiter == nil
            if block {
                // About to sleep: what the machine holds now is published before the wait.
                driver.countHeld()
                let snapshot = localStats
                stats.withLock { $0 = snapshot }
            }
            driver.turn(block: block)
            sleeping.store(false, ordering: .relaxed)
            let snapshot = localStats
            stats.withLock { $0 = snapshot }
        }
        // Drained: every request is done. The ring or epoll set is closed on this thread (a
        // SINGLE_ISSUER ring accepts registrations only from it). Commands and jobs that still
        // arrive are answered as after the end; jobs go to the global executor.
        driver.finishShutdown()
        let (lateCommands, lateJobs) = inbox.withLock { box -> ([LoopCommand], [UnownedJob]) in
            box.exited = true
            defer {
                box.commands.removeAll()
                box.jobs.removeAll()
            }
            return (box.commands, box.jobs)
        }
        for command in lateCommands { IOLoop.answerAfterExit(command) }
        for job in lateJobs { job.runSynchronously(on: asUnownedTaskExecutor()) }
        shutdownWaiter?.resume()
    }
}

// MARK: - TaskExecutor

extension IOLoop: TaskExecutor {
    /// Runs `job` on the loop's thread (after shutdown: on the global concurrent executor).
    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        let accepted = inbox.withLock { box -> Bool in
            if box.exited { return false }
            box.jobs.append(unowned)
            return true
        }
        if accepted {
            wake()
        } else {
            globalConcurrentExecutor.enqueue(ExecutorJob(unowned))
        }
    }
}

/// What other threads ask of the loop's thread.
enum LoopCommand {
    /// Start (or resume) receiving for a connection.
    case receive(LoopConnection)
    /// Run the large read recorded in the connection's state.
    case largeRead(LoopConnection)
    /// End the large read in flight early.
    case cancelLargeRead(LoopConnection)
    /// The reader is gone: stop everything for the connection.
    case detach(LoopConnection)
    /// Watch a connection's deadline.
    case deadline(LoopConnection)
    /// Start accepting on a listener, or stop.
    case listen(Listener)
    case unlisten(Listener)
    /// The consumer took connections: accepting may go on.
    case resumeAccept(Listener)
    /// Describe the loop's state (`debugState`), on its thread.
    case inspect(@Sendable (String) -> Void)
    /// Test seam: the next waits in the kernel fail.
    case injectFailures(count: Int, errno: Int32)
    /// Send the request the writer published (`LoopSender.Shared.request`).
    case send(LoopConnection)
    /// End the writer's send in flight early.
    case cancelSend(LoopConnection)
    /// Watch the writer's deadline.
    case sendDeadline(LoopConnection)
    /// The writer is gone.
    case detachSender(LoopConnection)
    /// `withConnection` ends: reader and writer are gone; resume once the descriptor is closed.
    case closeConnection(LoopConnection, CheckedContinuation<Void, Never>)
    /// Test seams: hold zero-copy notifications back (or release them); treat zero-copy as absent.
    case holdNotifications(Bool)
    case refuseZeroCopy
    case shutdown(CheckedContinuation<Void, Never>)
}

