import SystemPackage

// The readiness interface a loop waits with when it does not run on io_uring (epoll, or poll(2)
// wherever epoll is missing), how it is chosen, and the machine built over it.

extension IOLoop {
    /// The readiness interface a loop waits with when it does not run on io_uring (its
    /// `backend` is `.posix`, asked for or fallen back to): readiness, then a non-blocking
    /// `read(2)`.
    ///
    /// ```swift
    /// // The portable backend, on any platform (on Linux: to test what macOS runs).
    /// let loop = try IOLoop(options: .init(backend: .posix, events: .poll))
    /// ```
    ///
    /// A struct with static members rather than an enum, so that an interface added later (such
    /// as kqueue) is not a breaking change.
    public struct EventInterface: Sendable, Hashable, CustomStringConvertible {
        enum Kind: Sendable, Hashable {
            case automatic, epoll, poll
        }
        let kind: Kind

        /// epoll on Linux, `poll(2)` elsewhere. The `EXACTIO_EVENTS` environment variable
        /// (`epoll` or `poll`) overrides this choice, and only this one, as `EXACTIO_BACKEND`
        /// overrides `ExactReader.Backend.automatic`.
        public static let automatic = EventInterface(kind: .automatic)
        /// Linux's epoll (level-triggered). Elsewhere the loop's initializer refuses it with
        /// `ExactReader.InvalidOptionError`.
        public static let epoll = EventInterface(kind: .epoll)
        /// POSIX `poll(2)`, on every platform: each wait hands the kernel every descriptor the
        /// loop watches, so a wait costs time in proportion to the connections that wait for
        /// data. The interface where epoll and io_uring are missing (macOS); on Linux, for
        /// testing that path.
        public static let poll = EventInterface(kind: .poll)

        /// `automatic`, `epoll` or `poll`.
        public var description: String {
            switch kind {
            case .automatic: "automatic"
            case .epoll: "epoll"
            case .poll: "poll"
            }
        }

        /// The environment variable that lets an operator choose the interface of loops created
        /// with `.automatic`: `epoll` or `poll`.
        static let environmentVariable = "EXACTIO_EVENTS"

        /// Whether this platform has the interface.
        var isAvailable: Bool {
            #if os(Linux)
            true
            #else
            kind != .epoll
            #endif
        }

        /// The interface to use for `requested`, after `EXACTIO_EVENTS` (for `.automatic`
        /// only): never `.automatic`. The note says why the variable was ignored, if it was.
        static func resolve(_ requested: EventInterface, environment: [String: String])
            -> (interface: EventInterface, note: String?)
        {
            #if os(Linux)
            let platformDefault = EventInterface.epoll
            #else
            let platformDefault = EventInterface.poll
            #endif
            guard requested == .automatic else { return (requested, nil) }
            guard let raw = environment[environmentVariable], !raw.isEmpty else { return (platformDefault, nil) }
            switch raw.lowercased() {
            case "epoll" where EventInterface.epoll.isAvailable: return (.epoll, nil)
            case "poll": return (.poll, nil)
            case "automatic", "auto": return (platformDefault, nil)
            default:
                return (platformDefault, "\(environmentVariable)=\(raw) not understood here (expected \(EventInterface.epoll.isAvailable ? "epoll or poll" : "poll")): ignored")
            }
        }

        /// `resolve` with the process's environment.
        static func resolveFromProcess(_ requested: EventInterface) -> (interface: EventInterface, note: String?) {
            var environment: [String: String] = [:]
            if let value = getenv(environmentVariable) { environment[environmentVariable] = String(cString: value) }
            return resolve(requested, environment: environment)
        }

        /// The waker a loop on this interface uses: a pipe for `poll(2)` (the pair that runs
        /// where eventfd is missing, tested on Linux too), the platform's kind otherwise.
        var wakerKind: Waker.Kind { kind == .poll ? .pipe : Waker.platformKind }
    }

    /// The readiness interface the loop waits with: `.epoll` or `.poll`; nil when it runs on
    /// io_uring (`backend == .ioUring`).
    public var eventInterface: EventInterface? {
        backend == .posix ? readiness.interface : nil
    }

    /// The loop's machine over its readiness backend (epoll or poll(2)), for a loop that does
    /// not run on io_uring. On the loop's thread.
    func makeReadinessDriver(count: @escaping ((inout Counts) -> Void) -> Void) throws -> any LoopDriving {
        switch readiness.interface.kind {
        case .epoll:
            #if os(Linux)
            return makeMachine(try EpollLoopBackend(pool: pool, waker: waker), count: count)
            #else
            throw Errno.notSupported  // refused by Options.validate first
            #endif
        case .poll, .automatic:
            return makeMachine(PollLoopBackend(pool: pool, waker: waker), count: count)
        }
    }

    /// The loop's state machine over `backend`, with the loop's pools, waker and logger.
    func makeMachine<B: LoopBackend>(_ backend: B, count: @escaping ((inout Counts) -> Void) -> Void) -> LoopMachine<B> {
        let machine = LoopMachine(backend: backend, pool: pool, framePool: framePool, waker: waker, count: count)
        machine.logger = options.logger
        return machine
    }
}
