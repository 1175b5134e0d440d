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
///   in loop.connections(accepting: listener) { … } } }`. `makeReusePortListeners(port:)`
///   creates them.
public final class IOLoopGroup: Sendable {
    /// The loops, each with its thread.
    public let loops: [IOLoop]
    private let cursor = Atomic<Int>(0)

    /// Creates `count` loops (default: one per online core).
    public init(count: Int = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))), options: IOLoop.Options = IOLoop.Options()) throws {
        precondition(count >= 1, "IOLoopGroup needs at least one loop")
        var loops: [IOLoop] = []
        for _ in 0..<count { loops.append(try IOLoop(options: options)) }
        self.loops = loops
    }

    /// The next loop, round-robin.
    public func next() -> IOLoop {
        loops[cursor.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count]
    }

    /// Shuts every loop down.
    public func shutdown() async {
        for loop in loops { await loop.shutdown() }
    }

    /// One TCP listener per loop on `port` of `address` (IPv4 dotted form), each with
    /// `SO_REUSEPORT`, so that the kernel spreads incoming connections across the loops. Pass
    /// port 0 to let the kernel pick one (the same for all). The caller closes them.
    public func makeReusePortListeners(port: UInt16, address: String = "0.0.0.0", backlog: Int32 = 1024) throws -> [FileDescriptor] {
        var listeners: [FileDescriptor] = []
        var chosen = port
        do {
            for _ in loops {
                let fd = Platform.streamSocket(domain: AF_INET)
                guard fd >= 0 else { throw Errno(rawValue: errno) }
                listeners.append(FileDescriptor(rawValue: fd))
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, socklen_t(MemoryLayout<Int32>.size))
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                var addr = sockaddr_in()
                #if canImport(Darwin)
                addr.sin_len = UInt8(MemoryLayout<sockaddr_in>.size)
                #endif
                addr.sin_family = sa_family_t(AF_INET)
                addr.sin_port = chosen.bigEndian
                guard inet_pton(AF_INET, address, &addr.sin_addr) == 1 else { throw Errno.invalidArgument }
                var len = socklen_t(MemoryLayout<sockaddr_in>.size)
                let ok = withUnsafeMutablePointer(to: &addr) { p in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                        bind(fd, sa, len) == 0 && listen(fd, backlog) == 0 && getsockname(fd, sa, &len) == 0
                    }
                }
                guard ok else { throw Errno(rawValue: errno) }
                chosen = UInt16(bigEndian: addr.sin_port)
            }
        } catch {
            for l in listeners { try? l.close() }
            throw error
        }
        return listeners
    }
}
