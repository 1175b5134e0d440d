import ExactIO
import Logging
import Metrics
import ServiceLifecycle
import Synchronization
import SystemPackage

// ExactIOServer: a swift-service-lifecycle `Service` that owns an IOLoopGroup and its
// listeners, runs a handler per connection, and shuts down gracefully (stop accepting, let
// handlers finish their current frames within a grace period, cancel the rest, shut the loops
// down).

/// A server on an `IOLoopGroup`, as a swift-service-lifecycle `Service`: it accepts
/// connections on every loop and runs `handler` for each, as a child task, until it is shut
/// down.
///
/// ```swift
/// let server = try ExactIOServer(configuration: .init(endpoint: .tcp(host: "0.0.0.0", port: 9000))) { connection in
///     try await connection.loop.withConnection(connection.fileDescriptor) { reader, writer in
///         for try await frame in connection.frames(from: reader) {   // ends between frames at shutdown
///             try await store(frame)
///             try await writer.write(copying: ack(frame))
///         }
///     }
/// }
/// let group = ServiceGroup(services: [server], gracefulShutdownSignals: [.sigterm], logger: logger)
/// try await group.run()
/// ```
///
/// **Connections.** The listeners are bound when the server is created (so `port` is known
/// and a taken port fails there), and accepted on in `run()`: over TCP, one `SO_REUSEPORT`
/// listener per loop by default (the kernel spreads connections over the loops); over a unix
/// socket (or with `reusePort` false), one listener on the first loop, each connection handed
/// to the next loop round-robin. Each connection runs `handler` in a child task of a discarding
/// task group: a handler that throws ends its connection only (the error is logged at `debug`
/// and counted), never the server, and a finished handler is not kept.
///
/// **The descriptor belongs to the handler**: it closes it, whatever happens (the usual body,
/// `loop.withConnection(fd) { reader, writer in … }`, closes it at its end). The handler is
/// called for every accepted connection, also while the server is being cancelled.
///
/// **Graceful shutdown** (the `ServiceGroup`'s, on one of its signals such as SIGTERM or on
/// `triggerGracefulShutdown()`): the server stops accepting at once and closes its listeners
/// (connections still in their backlog are refused), and running handlers get
/// `Configuration.gracePeriod` to finish. A handler sees the
/// shutdown through `Connection.isShuttingDown`, through `Connection.frames(from:prefix:)`
/// (which ends at the next frame boundary: a frame that has begun to arrive is read whole, a
/// connection waiting for its next frame ends at once), or through swift-service-lifecycle's
/// own `Task.isShuttingDownGracefully`, `withGracefulShutdownHandler` and
/// `cancelOnGracefulShutdown()`, which work in handlers (they run in the server's task tree).
/// When the grace period ends, the handlers still running are cancelled (their reads throw
/// `CancellationError`); when they have returned, the loops shut down and `run()` returns (a
/// handler that ignores cancellation holds `run()` until it returns). A frame none of whose
/// bytes the loop had received when the shutdown began is not read: it was not acknowledged,
/// and its peer sends it again to the next server.
/// Cancelling the task that runs the server cancels every handler at once, with no grace.
///
/// **A listener that fails for good** (its accept sequence throws) stops the server the same
/// way: accepting stops everywhere, handlers get the grace period, and `run()` throws that
/// error.
///
/// **Metrics** (swift-metrics, through `Configuration.metricsFactory` or the global
/// `MetricsSystem`): each loop's `IOLoop.statistics` as counters (`<prefix>_loop_enters`,
/// `_reads`, `_completions`, `_wakeups`, `_starvations`, dimension `loop` = the loop's index),
/// incremented every `metricsInterval` and once more when serving ends; and, as they happen,
/// `<prefix>_connections_accepted` and `<prefix>_connection_failures` (handlers that threw,
/// a `CancellationError` of a cancelled handler aside) counters, the `<prefix>_connections_active` meter, and `<prefix>_connections_cancelled`
/// (handlers still running when the grace period ended). `<prefix>` is `metricsLabelPrefix`.
public final class ExactIOServer: Service, Sendable {
    /// What a server listens on, how many loops it runs, and how it shuts down.
    public struct Configuration: Sendable {
        /// Where a server listens.
        public enum Endpoint: Sendable, Hashable {
            /// TCP on `host` (as `IOLoop.listen(host:port:backlog:reusePort:)` takes it) and
            /// `port` (0: the kernel picks one; `ExactIOServer.port` tells which).
            case tcp(host: String, port: UInt16)
            /// A unix-domain stream socket at `path` (as `IOLoop.listen(unixPath:backlog:)`
            /// takes it). The server creates the socket file and removes it when it is done.
            case unix(path: String)
        }

        /// Where to listen.
        public var endpoint: Endpoint
        /// The listen backlog of each listener; default 1,024.
        public var backlog: Int
        /// Loops (threads) in the server's group; default one per online core.
        public var loopCount: Int
        /// Each loop's options. When its `logger` is nil, the loops log through `logger`.
        public var loopOptions: IOLoop.Options
        /// TCP only: one `SO_REUSEPORT` listener per loop (the kernel spreads connections) when
        /// true, the default; one listener, connections handed to the loops round-robin, when
        /// false.
        public var reusePort: Bool
        /// How long running handlers may go on after a graceful shutdown began before they are
        /// cancelled; default 30 seconds.
        public var gracePeriod: Duration
        /// How often the loops' counters are reported; nil: only once, when serving ends.
        /// Default 10 seconds.
        public var metricsInterval: Duration?
        /// The first part of every metric's label; default "exactio".
        public var metricsLabelPrefix: String
        /// Where metrics go; nil (the default): the global `MetricsSystem.factory` (which
        /// drops them until the application bootstraps it).
        public var metricsFactory: (any MetricsFactory)?
        /// The server's own events at `debug` (start and end, each handler that threw, a
        /// listener that failed, handlers cancelled at the end of the grace period), and the
        /// loops' when `loopOptions.logger` is nil; nil (the default) logs nothing.
        public var logger: Logger?

        /// A configuration with every field but `endpoint` defaulted (see each field).
        public init(
            endpoint: Endpoint,
            backlog: Int = 1024,
            loopCount: Int = IOLoopGroup.onlineCores,
            loopOptions: IOLoop.Options = IOLoop.Options(),
            reusePort: Bool = true,
            gracePeriod: Duration = .seconds(30),
            metricsInterval: Duration? = .seconds(10),
            metricsLabelPrefix: String = "exactio",
            metricsFactory: (any MetricsFactory)? = nil,
            logger: Logger? = nil
        ) {
            self.endpoint = endpoint
            self.backlog = backlog
            self.loopCount = loopCount
            self.loopOptions = loopOptions
            self.reusePort = reusePort
            self.gracePeriod = gracePeriod
            self.metricsInterval = metricsInterval
            self.metricsLabelPrefix = metricsLabelPrefix
            self.metricsFactory = metricsFactory
            self.logger = logger
        }
    }

    /// What a handler is given: an accepted connection, the loop it belongs to, and how to see
    /// that the server is shutting down.
    public struct Connection: Sendable {
        /// The accepted socket (non-blocking, close-on-exec). The handler owns it and closes
        /// it.
        public let fileDescriptor: FileDescriptor
        /// The loop to serve the connection on (its readers and writers).
        public let loop: IOLoop
        let stop: StopSignal

        /// True once the server has begun to shut down (a graceful shutdown, or a listener
        /// that failed): finish what is in hand and return.
        public var isShuttingDown: Bool { stop.isStopping }

        /// The frames `reader` reads, as `reader.frames(prefix:)` gives them, except that the
        /// sequence also ends at a frame boundary once the server shuts down: a frame that has
        /// begun to arrive (any of its bytes received) is read whole first; a connection that
        /// waits for its next frame ends at once. A frame this returns is never cut short by
        /// the shutdown, only by the end of the grace period (`CancellationError`).
        ///
        /// - Parameters:
        ///   - reader: The connection's reader (on `loop`).
        ///   - prefix: The length prefix; default 4 bytes, big-endian.
        public func frames(from reader: AsyncExactReader, prefix: LengthPrefix = .uint32(.bigEndian)) -> DrainingFrames {
            DrainingFrames(reader: reader, prefix: prefix, stop: stop)
        }
    }

    /// The configuration the server was created with.
    public let configuration: Configuration
    /// TCP: the port the listeners are bound to (the one the kernel picked for port 0). Nil for
    /// a unix socket.
    public let port: UInt16?
    private let handler: @Sendable (Connection) async throws -> Void
    private let state: Mutex<State>

    private enum State {
        /// Bound, not yet run: the listeners.
        case ready([FileDescriptor])
        case running
        case finished
    }

    /// Creates a server and binds its listeners (accepting starts with `run()`).
    ///
    /// - Parameters:
    ///   - configuration: Where to listen, the loops, the grace period, metrics, logging.
    ///   - handler: Runs for each connection, in a child task of the server; owns the
    ///     connection's descriptor (see `ExactIOServer`). What it throws ends that connection
    ///     only.
    /// - Throws: What `IOLoop.listen(host:port:backlog:reusePort:)` or
    ///   `IOLoop.listen(unixPath:backlog:)` throws (nothing is left open).
    public init(configuration: Configuration, handler: @escaping @Sendable (Connection) async throws -> Void) throws {
        precondition(configuration.loopCount >= 1, "ExactIOServer needs at least one loop")
        self.configuration = configuration
        self.handler = handler
        var listeners: [FileDescriptor] = []
        switch configuration.endpoint {
        case .tcp(let host, let port):
            let count = configuration.reusePort ? configuration.loopCount : 1
            var chosen = port
            do {
                for _ in 0..<count {
                    let fd = try IOLoop.listen(
                        host: host, port: chosen, backlog: configuration.backlog, reusePort: configuration.reusePort)
                    listeners.append(fd)
                    if chosen == 0 { chosen = try IOLoop.localPort(of: fd) }
                }
            } catch {
                for l in listeners { try? l.close() }
                throw error
            }
            self.port = chosen
        case .unix(let path):
            listeners = [try IOLoop.listen(unixPath: path, backlog: configuration.backlog)]
            self.port = nil
        }
        self.state = Mutex(.ready(listeners))
    }

    deinit {
        // Never run: the listeners (and the socket file) are still the server's.
        let listeners = state.withLock { s -> [FileDescriptor] in
            if case .ready(let l) = s { return l }
            return []
        }
        if !listeners.isEmpty { release(listeners) }
    }

    /// Accepts and serves connections until the server is shut down: a graceful shutdown (the
    /// grace period, then cancellation of the handlers still running), the task's
    /// cancellation (every handler cancelled at once), or a listener that failed for good
    /// (thrown after the grace period). Then the loops shut down, the listeners are closed (a
    /// unix socket's file removed), and it returns. A server runs once.
    ///
    /// - Throws: What `IOLoop.init(options:)` throws; the error of a listener that failed for
    ///   good; `ExactIOServer.AlreadyRunError` when called a second time.
    public func run() async throws {
        let listeners = try state.withLock { s throws(AlreadyRunError) -> [FileDescriptor] in
            guard case .ready(let l) = s else { throw AlreadyRunError() }
            s = .running
            return l
        }
        let run = ServerRun(server: self, metrics: ServerMetrics(configuration))
        defer {
            // Listeners handed to the acceptors are closed by them, as accepting stops.
            release(run.served.load(ordering: .relaxed) ? [] : listeners)
            state.withLock { $0 = .finished }
        }
        var loopOptions = configuration.loopOptions
        if loopOptions.logger == nil { loopOptions.logger = configuration.logger }
        let logger = configuration.logger
        try await IOLoopGroup.withLoopGroup(count: configuration.loopCount, options: loopOptions) { group in
            logger?.debug(
                "ExactIO server started",
                metadata: [
                    "exactio.endpoint": "\(configuration.endpoint)", "exactio.port": "\(port.map { "\($0)" } ?? "none")",
                    "exactio.loops": "\(group.loops.count)", "exactio.listeners": "\(listeners.count)",
                    "exactio.backend": "\(group.loops[0].backend)",
                ])
            await withGracefulShutdownHandler {
                await run.serve(group, listeners)
            } onGracefulShutdown: {
                run.stop.fire()
            }
            run.metrics.report(group.loops)
            logger?.debug("ExactIO server stopped accepting and drained; shutting the loops down")
        }
        if let failure = run.failure.withLock({ $0 }) { throw failure }
    }

    /// Closes the listeners and removes a unix socket's file.
    private func release(_ listeners: [FileDescriptor]) {
        for l in listeners { try? l.close() }
        if case .unix(let path) = configuration.endpoint { _ = unlink(path) }
    }

    /// `run()` was called on a server that has run (or runs).
    public struct AlreadyRunError: Error, CustomStringConvertible {
        public var description: String { "ExactIOServer.run(): this server has already run" }
    }

    fileprivate func callHandler(_ connection: Connection) async throws {
        try await handler(connection)
    }
}

/// One run of a server: its stop signal and its failure.
private final class ServerRun: Sendable {
    let server: ExactIOServer
    let stop = StopSignal()
    /// The listeners were handed to the acceptors, which close them when accepting stops.
    let served = Atomic<Bool>(false)
    let metrics: ServerMetrics
    /// A listener that failed for good (thrown by `run()` at the end).
    let failure = Mutex<(any Error)?>(nil)

    init(server: ExactIOServer, metrics: ServerMetrics) {
        self.server = server
        self.metrics = metrics
    }

    var logger: Logger? { server.configuration.logger }

    /// Accepts on every listener until the stop, then drains; reports metrics meanwhile.
    func serve(_ group: IOLoopGroup, _ listeners: [FileDescriptor]) async {
        served.store(true, ordering: .relaxed)
        await withDiscardingTaskGroup { tasks in
            if let interval = server.configuration.metricsInterval {
                tasks.addTask { [metrics] in
                    while (try? await Task.sleep(for: interval)) != nil { metrics.report(group.loops) }
                }
            }
            await withDiscardingTaskGroup { acceptors in
                if listeners.count == group.loops.count {
                    for (loop, listener) in zip(group.loops, listeners) {
                        acceptors.addTask { await self.accept(on: listener, loop: loop, handOff: nil) }
                    }
                } else {
                    acceptors.addTask { await self.accept(on: listeners[0], loop: group.loops[0], handOff: group) }
                }
            }
            tasks.cancelAll()  // the metrics reporter
        }
    }

    /// Accepts on `listener` with `loop`, a handler per connection (on `loop`, or the next loop
    /// of `handOff`), until the server stops; then gives the handlers the grace period, and
    /// cancels those still running.
    private func accept(on listener: FileDescriptor, loop: IOLoop, handOff: IOLoopGroup?) async {
        await withDiscardingTaskGroup { handlers in
            let active = ActiveCount()  // this listener's handlers still running
            let accepting = AcceptingIterator(loop.connections(accepting: listener).makeAsyncIterator())
            do {
                while let fd = try await accepting.next(unless: stop) {
                    let connection = ExactIOServer.Connection(fileDescriptor: fd, loop: handOff?.next() ?? loop, stop: stop)
                    active.enter()
                    metrics.accepted()
                    handlers.addTask {
                        await self.handle(connection)
                        active.leave()
                    }
                }
            } catch {
                let first = failure.withLock { f -> Bool in
                    guard f == nil && !stop.isStopping else { return false }
                    f = error
                    return true
                }
                if first {
                    logger?.debug(
                        "ExactIO server: a listener failed; stopping",
                        metadata: ["exactio.listener_fd": "\(listener.rawValue)", "exactio.error": "\(error)"])
                }
            }
            stop.fire()  // the other listeners stop too: the server is ending
            // Accepting stopped: the listener goes now, so that connections in its backlog are
            // refused at once (not when the handlers are done), and a successor may bind.
            accepting.finish()
            try? listener.close()
            let deadline = stop.deadline(grace: server.configuration.gracePeriod)
            if await !active.waitForZero(until: deadline) {
                let left = active.count
                metrics.cancelled(left)
                logger?.debug("ExactIO server: grace period over; cancelling handlers", metadata: ["exactio.handlers": "\(left)"])
                handlers.cancelAll()
            }
        }
    }

    private func handle(_ connection: ExactIOServer.Connection) async {
        defer { metrics.ended() }
        do {
            try await server.callHandler(connection)
        } catch is CancellationError where Task.isCancelled {
            // Cancelled at the end of the grace period, or with the run: counted as cancelled.
        } catch {
            metrics.failed()
            logger?.debug(
                "ExactIO server: a connection's handler threw",
                metadata: ["exactio.fd": "\(connection.fileDescriptor.rawValue)", "exactio.error": "\(error)"])
        }
    }
}

/// The accept iterator, taken by one task at a time (the race in `next(unless:)`).
private final class AcceptingIterator: @unchecked Sendable {
    // @unchecked Sendable: `iterator` is used by one task at a time: `next(unless:)` waits for
    // the child task that uses it before it returns, and is not called concurrently.
    private var iterator: AcceptedConnections.Iterator?

    init(_ iterator: AcceptedConnections.Iterator) {
        self.iterator = iterator
    }

    /// Stops accepting: the loop lets go of the listener, and closes what it accepted that was
    /// not taken.
    func finish() {
        iterator = nil
    }

    private enum Outcome: Sendable {
        case accepted(FileDescriptor?)
        case stopped
    }

    /// The next accepted connection, or nil when the sequence ended or `stop` fired (the
    /// accept is then abandoned: a connection it had accepted is closed).
    func next(unless stop: StopSignal) async throws -> FileDescriptor? {
        if stop.isStopping || iterator == nil { return nil }
        return try await withThrowingTaskGroup(of: Outcome.self) { group in
            group.addTask { .accepted(try await self.iterator?.next()) }
            group.addTask {
                await stop.wait()
                return .stopped
            }
            let first = try await group.next()!
            group.cancelAll()
            if case .accepted(let fd) = first { return fd }
            // Stopped: the accept, cancelled, ends with nil or with what it had.
            if case .accepted(let fd?)? = try? await group.next() { try? fd.close() }
            return nil
        }
    }
}
