import Synchronization
import SystemPackage

// IOLoopGroup: one loop per core, and SO_REUSEPORT listeners to spread connections.

/// Several loops, one per core: the scaling story of `IOLoop`.
///
/// Two ways to spread connections:
/// - one listener, `next()` round-robin: accept on one loop, create each connection's reader on
///   `group.next()`;
/// - one listener per loop on the same port with `SO_REUSEPORT` (the kernel spreads incoming
///   connections): `for (loop, listener) in zip(group.loops, listeners) { Task { for try await c
///   in loop.connections(accepting: listener) { … } } }`. `listen(host:port:backlog:)`
///   creates them.
///
/// `withLoopGroup(count:options:_:)` scopes a group: its loops shut down when the closure
/// returns or throws.
public final class IOLoopGroup: Sendable {
    /// The loops, each with its thread.
    public let loops: [IOLoop]
    private let cursor = Atomic<Int>(0)

    /// Creates `count` loops (default: one per online core).
    ///
    /// - Throws: What `IOLoop.init(options:)` throws for the first loop that cannot be made;
    ///   the loops made before it are then shut down (in a task of their own: this initializer
    ///   cannot wait).
    public init(count: Int = IOLoopGroup.onlineCores, options: IOLoop.Options = IOLoop.Options()) throws {
        precondition(count >= 1, "IOLoopGroup needs at least one loop")
        var loops: [IOLoop] = []
        do {
            for _ in 0..<count { loops.append(try IOLoop(options: options)) }
        } catch {
            let made = loops
            if !made.isEmpty { Task { for loop in made { await loop.shutdown() } } }
            throw error
        }
        self.loops = loops
    }

    private init(loops: [IOLoop]) {
        self.loops = loops
    }

    /// Online processors (`sysconf(_SC_NPROCESSORS_ONLN)`), at least 1: the default loop count.
    public static var onlineCores: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Runs `body` with a group of `count` new loops, and shuts them all down when it returns or
    /// throws (also when the task is cancelled): the scoped form of `init(count:options:)` plus
    /// `shutdown()`.
    ///
    /// ```swift
    /// try await IOLoopGroup.withLoopGroup { group in
    ///     let listeners = try group.listen(host: "0.0.0.0", port: 9000)
    ///     // … accept on every loop …
    /// }
    /// ```
    ///
    /// - Parameters:
    ///   - count: Loops in the group; default one per online core.
    ///   - options: Every loop's options.
    ///   - isolation: The actor `body` runs on: the caller's, by default.
    ///   - body: Runs with the group; what it returns is returned.
    /// - Throws: What `IOLoop.init(options:)` throws (the loops already made are shut down
    ///   first), or what `body` throws (after the shutdown).
    public static func withLoopGroup<Result>(
        count: Int = IOLoopGroup.onlineCores,
        options: IOLoop.Options = IOLoop.Options(),
        isolation: isolated (any Actor)? = #isolation,
        _ body: (IOLoopGroup) async throws -> Result
    ) async throws -> Result {
        precondition(count >= 1, "IOLoopGroup needs at least one loop")
        var loops: [IOLoop] = []
        do {
            for _ in 0..<count { loops.append(try IOLoop(options: options)) }
        } catch {
            for loop in loops { await loop.shutdown() }
            throw error
        }
        let group = IOLoopGroup(loops: loops)
        let result: Result
        do {
            result = try await body(group)
        } catch {
            await group.shutdown()
            throw error
        }
        await group.shutdown()
        return result
    }

    /// The next loop, round-robin.
    public func next() -> IOLoop {
        loops[cursor.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count]
    }

    /// Shuts every loop down.
    public func shutdown() async {
        for loop in loops { await loop.shutdown() }
    }

    /// One TCP listener per loop on the same port, each with `SO_REUSEPORT`, so that the
    /// kernel spreads incoming connections over the loops: `listeners[i]` is for `loops[i]`.
    ///
    /// ```swift
    /// let listeners = try group.listen(host: "0.0.0.0", port: 9000)
    /// for (loop, listener) in zip(group.loops, listeners) { /* loop.connections(accepting: listener) */ }
    /// ```
    ///
    /// Each is made as `IOLoop.listen(host:port:backlog:reusePort:)` makes one (close-on-exec,
    /// `SO_REUSEADDR`, the same host forms). With port 0 the kernel picks a port for the first
    /// and the others join it (`IOLoop.localPort(of:)` on any of them tells which). The caller
    /// owns the listeners and closes them; when it throws, none is left open.
    ///
    /// - Throws: As `IOLoop.listen(host:port:backlog:reusePort:)`.
    public func listen(host: String, port: UInt16, backlog: Int = 1024) throws(Errno) -> [FileDescriptor] {
        var listeners: [FileDescriptor] = []
        do throws(Errno) {
            var chosen = port
            for _ in loops {
                let fd = try IOLoop.listen(host: host, port: chosen, backlog: backlog, reusePort: true)
                listeners.append(fd)
                if chosen == 0 { chosen = try IOLoop.localPort(of: fd) }
            }
        } catch {
            for l in listeners { try? l.close() }
            throw error
        }
        return listeners
    }

    /// One TCP listener per loop on `port` of `address`, each with `SO_REUSEPORT`.
    @available(*, deprecated, message: "use listen(host:port:backlog:)")
    public func makeReusePortListeners(port: UInt16, address: String = "0.0.0.0", backlog: Int32 = 1024) throws -> [FileDescriptor] {
        try listen(host: address, port: port, backlog: Int(backlog))
    }
}
