import SystemPackage

// Listening sockets for a server: TCP (IPv4, IPv6, SO_REUSEPORT) and unix-domain, so that no
// caller writes socket/bind/listen by hand; and the port a listener was given.

extension IOLoop {
    /// A listening TCP socket on `host`:`port`, for `connections(accepting:)`.
    ///
    /// ```swift
    /// let listener = try IOLoop.listen(host: "127.0.0.1", port: 0)   // port 0: the kernel picks one
    /// let port = try IOLoop.localPort(of: listener)
    /// ```
    ///
    /// The socket is close-on-exec and blocking (the loop sets what it needs on its own
    /// duplicate), with `SO_REUSEADDR` (a restarted server can bind while connections of the
    /// previous one linger in TIME_WAIT). The caller owns it and closes it. The host is taken
    /// as written, never resolved (a server should not wait on DNS to start): an IPv4 literal
    /// (`"0.0.0.0"`: every IPv4 address), an IPv6 literal with or without brackets and with an
    /// optional zone (`"::"`: every address, IPv4 too, as IPv4-mapped: `IPV6_V6ONLY` is turned
    /// off for it; `"fe80::1%eth0"`), or `"localhost"`, which is 127.0.0.1 (write `"::1"` for
    /// the IPv6 loopback).
    ///
    /// The corresponding C functions are `socket`, `setsockopt`, `bind` and `listen`. Nothing is
    /// left open when it throws.
    ///
    /// - Parameters:
    ///   - host: The address to listen on, as above.
    ///   - port: The port; 0 lets the kernel pick a free one (`localPort(of:)` tells which).
    ///   - backlog: Connections the kernel holds for `accept` (capped by the system's
    ///     `net.core.somaxconn`); default 1,024.
    ///   - reusePort: Sets `SO_REUSEPORT`, so that other sockets with it (this process's or
    ///     another's of the same user) can listen on the same port and the kernel spreads new
    ///     connections over them (`IOLoopGroup.listen(host:port:backlog:)` makes one per loop);
    ///     default false.
    /// - Returns: The listening socket, owned by the caller.
    /// - Throws: `Errno.invalidArgument` for a host that is not an address literal or
    ///   `"localhost"`, or a backlog below 1; `Errno.addressInUse` for a taken port;
    ///   `Errno.addressNotAvailable` for an address that is not this machine's; any other
    ///   errno of the calls above.
    public static func listen(host: String, port: UInt16, backlog: Int = 1024, reusePort: Bool = false) throws(Errno) -> FileDescriptor {
        guard backlog >= 1 else { throw .invalidArgument }
        var address = try SocketAddress(host: host, port: port)
        let fd = Platform.streamSocket(domain: address.family)  // close-on-exec
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        do throws(Errno) {
            try setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            if reusePort { try setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) }
            if address.isIPv6Any { try setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, 0) }
            try address.withSockaddr { sa, len throws(Errno) in
                guard bind(fd, sa, len) == 0 else { throw Errno(rawValue: errno) }
            }
            guard systemListen(fd, backlog) == 0 else { throw Errno(rawValue: errno) }
        } catch {
            _ = posixClose(fd)
            throw error
        }
        return FileDescriptor(rawValue: fd)
    }

    /// A listening unix-domain stream socket bound to the file `unixPath`, for
    /// `connections(accepting:)`.
    ///
    /// The socket is close-on-exec and blocking; the caller owns it and closes it. Binding
    /// creates the socket file, and closing the socket does not remove it: remove it
    /// (`unlink`) when the server is done. A file already at the path (a previous run's socket
    /// left behind, too) makes it throw `Errno.addressInUse`: it is never removed for you.
    ///
    /// The corresponding C functions are `socket`, `bind` and `listen`. Nothing is left open
    /// when it throws.
    ///
    /// - Parameters:
    ///   - unixPath: The socket file's path: at most 107 bytes of UTF-8 (the kernel's
    ///     `sun_path` holds 108 with the terminating NUL), no NUL inside.
    ///   - backlog: Connections the kernel holds for `accept`; default 1,024.
    /// - Returns: The listening socket, owned by the caller.
    /// - Throws: `Errno.fileNameTooLong` for a path past 107 bytes; `Errno.invalidArgument` for
    ///   an empty path, one with a NUL, or a backlog below 1; `Errno.addressInUse` when a file
    ///   exists at the path; any other errno of `bind` (`Errno.noSuchFileOrDirectory` for a
    ///   missing directory, `Errno.permissionDenied`) or the other calls.
    public static func listen(unixPath: String, backlog: Int = 1024) throws(Errno) -> FileDescriptor {
        guard backlog >= 1, !unixPath.isEmpty, !unixPath.utf8.contains(0) else { throw .invalidArgument }
        var address = sockaddr_un()
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        let path = Array(unixPath.utf8)
        guard path.count < capacity else { throw .fileNameTooLong }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: path)  // the rest stays zero: the terminating NUL
        }
        let fd = Platform.streamSocket(domain: AF_UNIX)  // close-on-exec
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + path.count + 1)
        let bound = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 }
        }
        guard bound, systemListen(fd, backlog) == 0 else {
            let e = Errno(rawValue: errno)
            _ = posixClose(fd)
            throw e
        }
        return FileDescriptor(rawValue: fd)
    }

    /// The local port of a TCP socket: for a listener bound to port 0, the one the kernel
    /// picked.
    ///
    /// The corresponding C function is `getsockname`.
    ///
    /// - Throws: `Errno.addressFamilyNotSupported` when the socket is not an IPv4 or IPv6 one
    ///   (a unix-domain socket); any errno of `getsockname` (`Errno.badFileDescriptor`,
    ///   `Errno.notSocket`).
    public static func localPort(of socket: FileDescriptor) throws(Errno) -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(socket.rawValue, $0, &length) == 0 }
        }
        guard ok else { throw Errno(rawValue: errno) }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: &storage) { UInt16(bigEndian: $0.load(as: sockaddr_in.self).sin_port) }
        case AF_INET6:
            return withUnsafeBytes(of: &storage) { UInt16(bigEndian: $0.load(as: sockaddr_in6.self).sin6_port) }
        default:
            throw .addressFamilyNotSupported
        }
    }

    private static func setOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32) throws(Errno) {
        var v = value
        guard setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) == 0 else { throw Errno(rawValue: errno) }
    }
}

/// `listen(2)` (the name is taken inside `IOLoop`).
private func systemListen(_ fd: Int32, _ backlog: Int) -> Int32 {
    listen(fd, Int32(clamping: backlog))
}

/// An IPv4 or IPv6 socket address parsed from a literal (never resolved).
struct SocketAddress {
    enum Storage {
        case v4(sockaddr_in)
        case v6(sockaddr_in6)
    }
    var storage: Storage

    /// `host`: an IPv4 literal, an IPv6 literal (brackets and a `%zone` allowed), or
    /// "localhost" (127.0.0.1). `Errno.invalidArgument` otherwise.
    init(host: String, port: UInt16) throws(Errno) {
        var text = host
        if text == "localhost" { text = "127.0.0.1" }
        if text.hasPrefix("[") && text.hasSuffix("]") && text.count >= 2 { text = String(text.dropFirst().dropLast()) }
        var v4 = sockaddr_in()
        if inet_pton(AF_INET, text, &v4.sin_addr) == 1 {
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = port.bigEndian
            storage = .v4(v4)
            return
        }
        var v6 = sockaddr_in6()
        var zone: Substring? = nil
        if let percent = text.firstIndex(of: "%") {
            zone = text[text.index(after: percent)...]
            text = String(text[..<percent])
        }
        guard inet_pton(AF_INET6, text, &v6.sin6_addr) == 1 else { throw .invalidArgument }
        if let zone {
            // A zone is an interface name or number (link-local addresses need one).
            if let n = UInt32(zone) {
                v6.sin6_scope_id = n
            } else {
                let index = if_nametoindex(String(zone))
                guard index != 0 else { throw .invalidArgument }
                v6.sin6_scope_id = index
            }
        }
        v6.sin6_family = sa_family_t(AF_INET6)
        v6.sin6_port = port.bigEndian
        storage = .v6(v6)
    }

    var family: Int32 {
        switch storage {
        case .v4: AF_INET
        case .v6: AF_INET6
        }
    }

    /// "::": the IPv6 wildcard, which also takes IPv4 connections when `IPV6_V6ONLY` is off.
    var isIPv6Any: Bool {
        guard case .v6(let a) = storage else { return false }
        return withUnsafeBytes(of: a.sin6_addr) { $0.allSatisfy { $0 == 0 } }
    }

    mutating func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(Errno) -> R) throws(Errno) -> R {
        switch storage {
        case .v4(var a):
            return try withUnsafePointer(to: &a) { p throws(Errno) in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa throws(Errno) in
                    try body(sa, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        case .v6(var a):
            return try withUnsafePointer(to: &a) { p throws(Errno) in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa throws(Errno) in
                    try body(sa, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        }
    }
}
