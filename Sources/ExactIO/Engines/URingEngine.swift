#if EXACTIO_URING
import ExactIOCSupport
import Synchronization
import SystemPackage

// The blocking reader's io_uring engine (READ_FIXED into registered memory, READ otherwise, reads
// in flight for files, splice for `forward`), and the io_uring half of backend selection.

/// io_uring through ExactIOCSupport: READ_FIXED into registered memory, READ otherwise.
final class URingEngine: IOEngine {
    let ring: RingHandle
    let fd: FileDescriptor
    /// `read(2)` for a child process that inherited the ring (fork), created on first need.
    private var posix: PosixEngine? = nil
    /// Regular files: large reads go as `queueDepth` requests in flight at explicit offsets
    /// (`Options.queueDepth`), each of `multiChunk` bytes.
    let isRegularFile: Bool
    let queueDepth: Int
    static let multiChunk = 1 << 20

    init(ring: RingHandle, fd: FileDescriptor, isRegularFile: Bool = false, queueDepth: Int = 1) {
        self.ring = ring
        self.fd = fd
        self.isRegularFile = isRegularFile
        self.queueDepth = queueDepth
    }

    /// `forward`'s io_uring path: `count` bytes from the reader's descriptor to `destination`
    /// through the pipe, two linked IORING_OP_SPLICEs per chunk. Nil when this engine reads
    /// with `read(2)` (a forked child).
    func splice(to destination: Int32, pipeRead: Int32, pipeWrite: Int32, capacity: Int, count: Int)
        -> (moved: Int, inPipe: Int, submissions: Int, error: Errno?)?
    {
        guard posix == nil, ring.unusable == nil else { return nil }
        var req = csupport_splice_req(
            in: fd.rawValue, out: destination, pipe_r: pipeRead, pipe_w: pipeWrite, len: count, chunk: capacity)
        var res = csupport_splice_res()
        let ret = csupport_splice(ring.pointer, &req, &res)
        return (res.moved, res.in_pipe, Int(res.submissions), ret < 0 ? errnoFromNegative(ret) : nil)
    }

    /// Test seam: `csupport_read_multi` handles completions in reverse order.
    func shuffleCompletions(_ on: Bool) {
        csupport_debug_shuffle_completions(ring.pointer, on ? 1 : 0)
    }

    /// Reads in flight: all of `dst` (or up to the end of the file) at `offset`, or at the
    /// current position (which is then moved past the bytes read, as `read(2)` would).
    func readInFlight(into dst: UnsafeMutableRawBufferPointer, slot: Int32, offset: Int64) -> EngineResult {
        var at = offset
        if at < 0 {
            at = Int64(lseek(fd.rawValue, 0, SEEK_CUR))
            if at < 0 { return EngineResult(error: Errno(rawValue: errno)) }
        }
        var req = csupport_multi_req(
            fd: fd.rawValue, slot: slot, dst: dst.baseAddress, len: dst.count, offset: at,
            chunk: Self.multiChunk, depth: UInt32(queueDepth))
        var res = csupport_read_res()
        let ret = csupport_read_multi(ring.pointer, &req, &res)
        var result = Self.result(ret, res)
        if offset < 0 && lseek(fd.rawValue, off_t(at) + off_t(res.done), SEEK_SET) < 0 && result.error == nil {
            result.error = Errno(rawValue: errno)
        }
        return result
    }

    var kind: ExactReader.Backend { posix == nil ? .ioUring : .posix }

    var degradation: String? {
        guard posix != nil else { return nil }
        return "io_uring not used: this process inherited the reader's ring through fork(); "
            + "reading with read(2) instead (the ring and its registered buffers belong to the parent)"
    }

    func readiness() -> Readiness { PosixSyscalls.live.readiness(fd) }

    /// Test seam: the next `count` waits for a completion fail with `errno` (see
    /// `csupport_debug_fail_waits`).
    func injectWaitFailures(_ count: Int, errno: Int32) {
        csupport_debug_fail_waits(ring.pointer, Int32(count), errno)
    }

    func read(
        into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32, offset: Int64, deadline: Int64
    ) -> EngineResult {
        if let posix { return posix.read(into: dst, atLeast: minimum, slot: -1, offset: offset, deadline: deadline) }
        if let why = ring.unusable {
            if why == .fileDescriptorInBadState {
                // fork(): the child's memory is its own copy; the parent's ring must not be touched.
                let p = PosixEngine(fd: fd)
                posix = p
                return p.read(into: dst, atLeast: minimum, slot: -1, offset: offset, deadline: deadline)
            }
            return EngineResult(error: why)
        }
        if isRegularFile && queueDepth > 1 && dst.count >= 2 * Self.multiChunk {
            // A regular file never blocks for long: no deadline per request.
            return readInFlight(into: dst, slot: slot, offset: offset)
        }
        var timeout: Int64 = 0
        if deadline > 0 {
            timeout = deadline - monotonicNanoseconds()
            if timeout <= 0 { return EngineResult(error: .timedOut) }
        }
        var req = csupport_read_req(
            fd: fd.rawValue, slot: slot, dst: dst.baseAddress, cap: dst.count, min: minimum, offset: offset,
            timeout_ns: timeout)
        var res = csupport_read_res()
        let ret = csupport_read(ring.pointer, &req, &res)
        return Self.result(ret, res)
    }

    /// What a csupport read call did, as an engine result: a broken ring (-ENOTRECOVERABLE)
    /// means the kernel may still write into the destination.
    static func result(_ ret: Int32, _ res: csupport_read_res) -> EngineResult {
        var result = EngineResult(
            count: res.done, error: ret < 0 ? errnoFromNegative(ret) : nil,
            reads: Int(res.reads), fixedReads: Int(res.fixed_reads), polls: Int(res.polls))
        if result.error == .notRecoverable { result.destinationPoisoned = true }
        return result
    }
}

extension BackendSelection {
    /// The io_uring half of `make`: ring, then probe, then registration. The first two decide
    /// the backend (`posix` with the reason when they fail and io_uring was not `demanded`);
    /// registration only decides whether reads are READ_FIXED.
    static func makeURing(
        fd: FileDescriptor,
        fileType: mode_t,
        options: ExactReader.Options,
        demanded: Bool,
        joined: (ExactReader.FallbackReason?) -> ExactReader.FallbackReason?,
        posix: (ExactReader.FallbackReason?) -> BackendSetup
    ) throws(Errno) -> BackendSetup {
        // io_uring: ring, then probe, then registration. The first two decide the backend;
        // registration only decides whether reads are READ_FIXED.
        let isRegular = fileType == S_IFREG
        // Regular files keep up to `queueDepth` reads in flight: room for them in the ring.
        var entries: UInt32 = 8
        while isRegular && Int(entries) < options.queueDepth { entries <<= 1 }
        let ring: RingHandle
        switch RingHandle.create(entries: entries) {
        case .success(let r): ring = r
        case .failure(let e):
            if demanded { throw e }
            return posix(joined(because(.ringSetup, e, ringFailure(e))))
        }
        let ops: URingOps
        switch ring.probe() {
        case .success(let bits): ops = URingOps(rawValue: bits)
        case .failure(let e):
            if demanded { throw e }
            return posix(joined(because(.probe, e, "io_uring probe failed: \(describe(e))")))
        }
        let needed: URingOps = [.read, .pollAdd, .linkTimeout, .asyncCancel]
        guard ops.isSuperset(of: needed) else {
            if demanded { throw Errno.notSupported }
            return posix(joined(because(
                .missingOperations, nil,
                "io_uring lacks IORING_OP_READ, POLL_ADD, LINK_TIMEOUT or ASYNC_CANCEL (kernel older than 5.6)")))
        }
        let engine = URingEngine(ring: ring, fd: fd, isRegularFile: isRegular, queueDepth: options.queueDepth)

        var registrar: URingRegistrar? = nil
        var reason: ExactReader.FallbackReason? = nil
        if !ops.contains(.readFixed) {
            reason = because(.missingOperations, nil, "registered buffers unused: io_uring lacks IORING_OP_READ_FIXED")
        } else if options.registeredMemoryLimit == 0 {
            reason = because(.bufferRegistration, nil, "registered buffers unused: registeredMemoryLimit is 0")
        } else {
            do throws(Errno) {
                registrar = try URingRegistrar(ring: ring)
            } catch {
                reason = because(
                    .bufferRegistration, error,
                    "registered buffers unused: sparse buffer table registration failed: \(describe(error))")
            }
        }
        return BackendSetup(
            engine: engine,
            pool: MemoryPool(registrar: registrar, registrationLimit: options.registeredMemoryLimit),
            fallback: joined(reason), fileType: fileType)
    }
}
#endif
