import Glibc
import SystemPackage

/// What backend selection produced: an engine, the pool it reads into, and why any part of
/// io_uring was given up.
struct BackendSetup {
    let engine: any IOEngine
    let pool: MemoryPool
    let fallbackReason: String?
    /// The ring's buffer table, when io_uring runs with registered buffers; the reader asks
    /// it why a registration failed.
    let registrar: URingRegistrar?
}

enum BackendSelection {
    /// The environment variable that lets an operator force a backend for `.automatic`
    /// readers: `posix` or `uring` (also `io_uring`, `iouring`).
    static let environmentVariable = "EXACTIO_BACKEND"

    /// Sparse table size: one slot per registered block (staging, frames, caller buffers).
    static let registeredSlots = 1024

    static func describe(_ e: Errno) -> String {
        "\(e) (errno \(e.rawValue))"
    }

    /// The registration budget: RLIMIT_MEMLOCK for unprivileged users, capped at 1 GiB.
    static func registrationBudget(limit: Int?) -> Int {
        if let limit { return limit }
        var rl = rlimit()
        let cap = 1 << 30
        guard getrlimit(Int32(__RLIMIT_MEMLOCK.rawValue), &rl) == 0 else { return cap }
        if geteuid() == 0 || rl.rlim_cur == rlim_t.max { return cap }
        return min(cap, Int(clamping: rl.rlim_cur))
    }

    static func memlockDescription() -> String {
        var rl = rlimit()
        guard getrlimit(Int32(__RLIMIT_MEMLOCK.rawValue), &rl) == 0 else { return "unknown" }
        if rl.rlim_cur == rlim_t.max { return "unlimited" }
        return "\(rl.rlim_cur >> 10) KiB"
    }

    /// Why the staging buffer is not registered although io_uring has a buffer table: the
    /// kernel refused (usually ENOMEM: RLIMIT_MEMLOCK), or it is over the budget.
    static func unregisteredStagingReason(registrar: URingRegistrar, stagingCapacity: Int, limit: Int?) -> String {
        let tail = "; io_uring reads go to unregistered memory"
        if let e = registrar.lastFailure {
            let memlock = e == .noMemory ? "; RLIMIT_MEMLOCK is \(memlockDescription())" : ""
            return "registered buffers unused: registering the staging buffer failed: \(describe(e))\(memlock)\(tail)"
        }
        let budget = registrationBudget(limit: limit)
        let source = limit == nil ? "RLIMIT_MEMLOCK is \(memlockDescription())" : "registeredMemoryLimit"
        return "registered buffers unused: the staging buffer (\(stagingCapacity >> 10) KiB) is over "
            + "the registration budget (\(budget >> 10) KiB; \(source))\(tail)"
    }

    static func fileType(_ fd: FileDescriptor) throws(Errno) -> mode_t {
        var st = stat()
        if fstat(fd.rawValue, &st) != 0 { throw Errno(rawValue: errno) }
        return st.st_mode & S_IFMT
    }

    static func make(
        fd: FileDescriptor,
        options: ExactReader.Options,
        syscalls: PosixSyscalls?,
        environment: [String: String]
    ) throws(Errno) -> BackendSetup {
        let posix = {
            BackendSetup(
                engine: PosixEngine(fd: fd, syscalls: syscalls ?? .live),
                pool: MemoryPool(registrar: nil, registrationBudget: 0), fallbackReason: $0, registrar: nil)
        }
        if syscalls != nil { return posix(nil) }  // tests and fuzzing: a scripted POSIX backend

        let isSocket = try fileType(fd) == S_IFSOCK
        var wanted = options.backend
        var forced: String? = nil
        if wanted == .automatic, let env = environment[environmentVariable]?.lowercased(), !env.isEmpty {
            switch env {
            case "posix": wanted = .posix; forced = "\(environmentVariable)=posix"
            case "uring", "io_uring", "iouring": wanted = .ioUring; forced = "\(environmentVariable)=\(env)"
            default: break
            }
        }
        if wanted == .posix {
            return posix(forced.map { "io_uring not used: forced by \($0)" })
        }

        // io_uring: ring, then probe, then registration. The first two decide the backend;
        // registration only decides whether reads are READ_FIXED.
        let ring: RingHandle
        switch RingHandle.create() {
        case .success(let r): ring = r
        case .failure(let e):
            if wanted == .ioUring { throw e }
            var why = "io_uring_setup failed: \(describe(e))"
            if e == .notPermitted || e == .permissionDenied {
                why += "; blocked by seccomp (containers) or the kernel.io_uring_disabled sysctl"
            } else if e == .noFunction {
                why += "; kernel built without io_uring"
            }
            return posix(why)
        }
        let ops: URingOps
        switch ring.probe() {
        case .success(let bits): ops = URingOps(rawValue: bits)
        case .failure(let e):
            if wanted == .ioUring { throw e }
            return posix("io_uring probe failed: \(describe(e))")
        }
        guard ops.contains(.read) else {
            if wanted == .ioUring { throw Errno.notSupported }
            return posix("io_uring lacks IORING_OP_READ (kernel older than 5.6)")
        }

        // EXACTIO_SOCKET_READ=fixed|waitall overrides the threshold (for measurements).
        var threshold = options.recvWaitAllThreshold
        switch environment["EXACTIO_SOCKET_READ"] {
        case "fixed": threshold = .max
        case "waitall": threshold = 0
        default: break
        }
        if !ops.contains(.recv) { threshold = .max }
        let engine = URingEngine(ring: ring, fd: fd, isSocket: isSocket, waitAllThreshold: threshold)

        var registrar: URingRegistrar? = nil
        var reason: String? = nil
        let budget = registrationBudget(limit: options.registeredMemoryLimit)
        if !ops.contains(.readFixed) {
            reason = "registered buffers unused: io_uring lacks IORING_OP_READ_FIXED"
        } else if budget <= 0 {
            reason = "registered buffers unused: registeredMemoryLimit is 0"
        } else {
            do throws(Errno) {
                registrar = try URingRegistrar(ring: ring, slots: registeredSlots)
            } catch {
                reason = "registered buffers unused: sparse buffer table registration failed: \(describe(error))"
            }
        }
        return BackendSetup(
            engine: engine,
            pool: MemoryPool(registrar: registrar, registrationBudget: budget),
            fallbackReason: reason, registrar: registrar)
    }
}
