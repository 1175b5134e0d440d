import SystemPackage

// Choosing a reader's engine when it is created: the descriptor's type, EXACTIO_BACKEND,
// io_uring or read(2), registration, and the fallback reasons that say why.

/// What backend selection produced: an engine, the pool it reads into, and why any part of
/// io_uring was given up.
struct BackendSetup {
    let engine: any IOEngine
    let pool: MemoryPool
    let fallback: ExactReader.FallbackReason?
    /// `S_IFMT` bits of the descriptor (0 for a scripted reader, which has none).
    let fileType: mode_t
}

enum BackendSelection {
    /// The environment variable that lets an operator force a backend for `.automatic`
    /// readers: `posix` or `uring` (also `io_uring`, `iouring`).
    static let environmentVariable = "EXACTIO_BACKEND"

    static func describe(_ e: Errno) -> String {
        "\(e) (errno \(e.rawValue))"
    }

    /// A fallback reason from its parts.
    static func because(_ step: ExactReader.FallbackReason.Step, _ errno: Errno?, _ text: String) -> ExactReader.FallbackReason {
        .init(step: step, errno: errno, description: text)
    }

    /// Why memory is not registered, as a fallback reason.
    static func reason(_ refusal: RegistrationRefusal, what: String, bytes: Int) -> ExactReader.FallbackReason {
        var errno: Errno? = nil
        if case .kernel(let e) = refusal { errno = e }
        return because(.bufferRegistration, errno, describe(refusal, what: what, bytes: bytes))
    }

    /// Why memory is not registered, as a sentence for `fallbackReason`.
    static func describe(_ refusal: RegistrationRefusal, what: String, bytes: Int) -> String {
        let tail = "; io_uring reads go to unregistered memory"
        switch refusal {
        case .noTable:
            return "registered buffers unused: no registered-buffer table\(tail)"
        case .overReaderLimit(let limit):
            return "registered buffers unused: \(what) (\(bytes >> 10) KiB) is over registeredMemoryLimit "
                + "(\(limit >> 10) KiB)\(tail)"
        case .overProcessBudget:
            return "registered buffers unused: \(what) (\(bytes >> 10) KiB) does not fit the process-wide "
                + "registration budget: \(RegistrationBudget.shared.describe())\(tail)"
        case .kernel(let e):
            var why = "registered buffers unused: registering \(what) failed: \(describe(e))"
            if e == .noMemory {
                why += "; RLIMIT_MEMLOCK (\(memlockDescription()), per user, shared with the user's other "
                    + "processes) is exhausted; \(RegistrationBudget.shared.describe())"
            }
            return why + tail
        }
    }

    /// Why the ring could not be created, as a sentence for `fallbackReason`.
    static func ringFailure(_ e: Errno) -> String {
        var why = "io_uring_setup failed: \(describe(e))"
        switch e {
        case .notPermitted, .permissionDenied:
            why += "; blocked by seccomp (containers) or the kernel.io_uring_disabled sysctl"
        case .noFunction:
            why += "; kernel built without io_uring"
        case .noMemory where !RegistrationBudget.isUnlimited:
            why += "; RLIMIT_MEMLOCK (\(memlockDescription()), per user, shared with the user's other "
                + "processes, released a moment after rings close) is exhausted: each ring costs "
                + "\(2 * Block.pageSize >> 10) KiB of it; \(RegistrationBudget.shared.describe())"
        case .tooManyOpenFiles:
            why += "; the descriptor limit (RLIMIT_NOFILE) is reached: each ring is a descriptor"
        default:
            break
        }
        return why
    }

    static func fileType(_ fd: FileDescriptor) throws(Errno) -> mode_t {
        var st = stat()
        if fstat(fd.rawValue, &st) != 0 { throw Errno(rawValue: errno) }
        return st.st_mode & S_IFMT
    }

    /// ExactIO reads byte streams: a socket must be SOCK_STREAM. Datagram and sequenced-packet
    /// sockets have message boundaries a stream reader would lose (an empty datagram would
    /// read as end of stream, a read ending inside a datagram would drop its tail), so they
    /// are refused with `Errno.protocolWrongTypeForSocket` (EPROTOTYPE).
    static func requireStreamSocket(_ fd: FileDescriptor) throws(Errno) {
        var type: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd.rawValue, SOL_SOCKET, SO_TYPE, &type, &len) == 0 else { throw Errno(rawValue: errno) }
        if type != Platform.streamSocketType { throw .protocolWrongTypeForSocket }
    }

    /// The backend to try for `requested`, after the operator's `EXACTIO_BACKEND` (it applies
    /// to `.automatic` only): with the override that forced it, or a note that the variable was
    /// not understood.
    static func resolve(_ requested: ExactReader.Backend, environment: [String: String])
        -> (wanted: ExactReader.Backend, forced: String?, note: String?)
    {
        guard requested == .automatic, let raw = environment[environmentVariable], !raw.isEmpty else {
            return (requested, nil, nil)
        }
        switch raw.lowercased() {
        case "posix": return (.posix, "\(environmentVariable)=\(raw)", nil)
        case "uring", "io_uring", "iouring": return (.ioUring, "\(environmentVariable)=\(raw)", nil)
        case "automatic", "auto": return (.automatic, nil, nil)
        default: return (.automatic, nil, "\(environmentVariable)=\(raw) not understood (expected posix or uring): ignored")
        }
    }

    static func make(
        fd: FileDescriptor,
        options: ExactReader.Options,
        syscalls: PosixSyscalls?,
        environment: [String: String]
    ) throws(Errno) -> BackendSetup {
        // Tests and fuzzing: a scripted POSIX backend, no descriptor.
        let type = syscalls == nil ? try fileType(fd) : 0
        let posix = { (reason: ExactReader.FallbackReason?) in
            BackendSetup(
                engine: PosixEngine(fd: fd, syscalls: syscalls ?? .live),
                pool: MemoryPool(registrar: nil, registrationLimit: nil), fallback: reason, fileType: type)
        }
        if syscalls != nil { return posix(nil) }

        if type == S_IFSOCK { try requireStreamSocket(fd) }
        let (wanted, forced, note) = resolve(options.backend, environment: environment)
        func joined(_ reason: ExactReader.FallbackReason?) -> ExactReader.FallbackReason? {
            switch (note, reason) {
            case (nil, let r): r
            case (let n?, nil): .init(step: .environmentIgnored, errno: nil, description: n)
            case (let n?, let r?): .init(step: r.step, errno: r.errno, description: n + "; " + r.description)
            }
        }
        if wanted == .posix {
            return posix(forced.map { because(.forcedByEnvironment, nil, "io_uring not used: forced by \($0)") })
        }

        #if EXACTIO_URING
        return try makeURing(
            fd: fd, fileType: type, options: options, demanded: wanted == .ioUring, joined: joined, posix: posix)
        #else
        if wanted == .ioUring { throw Errno.notSupported }
        return posix(joined(because(
            .notInThisBuild, nil,
            "io_uring not used: this build of ExactIO leaves it out (the IOUring trait is off, EXACTIO_NO_URING=1, or not Linux)")))
        #endif
    }
}
