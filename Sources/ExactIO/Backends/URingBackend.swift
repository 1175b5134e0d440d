#if EXACTIO_URING
import ExactIOCSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization
import SystemPackage

// The only Swift file that talks to ExactIOCSupport's ring and read loop (and so, through it, to
// liburing).

/// Owns a `csupport_ring`. Shared by the engine (submissions, reader's thread) and the
/// registrar (slot updates), so the ring lives until both are gone. Views never reach it.
final class RingHandle: @unchecked Sendable {
    // @unchecked Sendable: submissions happen only from the reader's owner (the reader is not
    // Sendable); the registrar's updates are serialized by its own lock, and the kernel
    // serializes register syscalls against submissions.
    let pointer: OpaquePointer

    private init(pointer: OpaquePointer) {
        self.pointer = pointer
        RegistrationBudget.shared.openRings.add(1, ordering: .relaxed)
    }

    /// Creates a ring, or returns the errno that failed.
    static func create(entries: UInt32 = 8, flags: UInt32 = 0) -> Result<RingHandle, Errno> {
        var ring: OpaquePointer? = nil
        let ret = csupport_ring_create(entries, flags, &ring)
        guard ret == 0, let ring else { return .failure(errnoFromNegative(ret)) }
        return .success(RingHandle(pointer: ring))
    }

    /// The CSUPPORT_OP_* bit set, or the errno of the probe.
    func probe() -> Result<Int32, Errno> {
        let ops = csupport_ring_probe(pointer)
        return ops < 0 ? .failure(errnoFromNegative(ops)) : .success(ops)
    }

    /// nil when this process may submit; else why not (`Errno.fileDescriptorInBadState`:
    /// inherited through fork(); `Errno.notRecoverable`: broken).
    var unusable: Errno? {
        let r = csupport_ring_usable(pointer)
        return r == 0 ? nil : errnoFromNegative(r)
    }

    deinit {
        csupport_ring_destroy(pointer)
        RegistrationBudget.shared.openRings.subtract(1, ordering: .relaxed)
    }
}

extension Errno {
    /// EBADFD, which swift-system does not name: ExactIOCSupport's "the ring was inherited through
    /// fork()".
    static var fileDescriptorInBadState: Errno { Errno(rawValue: EBADFD) }
}

struct URingOps: OptionSet {
    let rawValue: Int32
    static let read = URingOps(rawValue: Int32(CSUPPORT_OP_READ))
    static let readFixed = URingOps(rawValue: Int32(CSUPPORT_OP_READ_FIXED))
    static let recv = URingOps(rawValue: Int32(CSUPPORT_OP_RECV))
    static let pollAdd = URingOps(rawValue: Int32(CSUPPORT_OP_POLL_ADD))
    static let linkTimeout = URingOps(rawValue: Int32(CSUPPORT_OP_LINK_TIMEOUT))
    static let asyncCancel = URingOps(rawValue: Int32(CSUPPORT_OP_ASYNC_CANCEL))
    static let accept = URingOps(rawValue: Int32(CSUPPORT_OP_ACCEPT))
}

/// The ring's sparse buffer table: one slot per registered block. Its own lock serializes the
/// slot list and the update syscalls; it may be called from any thread (a view released on
/// another thread returns its block, which may be unregistered then).
final class URingRegistrar: BlockRegistrar, Sendable {
    let ring: RingHandle
    private let freeSlots: Locked<[Int32]>

    /// Sparse table size: one slot per registered block (staging, frames, caller buffers).
    static let slots = 1024

    /// Registers a sparse table of `slots` entries; fails with the kernel's errno.
    init(ring: RingHandle, slots: Int = URingRegistrar.slots) throws(Errno) {
        let ret = csupport_register_sparse(ring.pointer, UInt32(slots))
        if ret < 0 { throw errnoFromNegative(ret) }
        self.ring = ring
        self.freeSlots = Locked((0..<Int32(slots)).reversed())
    }

    func register(base: UnsafeMutableRawPointer, count: Int) -> Result<RegisteredSlot, Errno> {
        // The kernel refuses registered buffers over 1 GiB.
        guard count <= 1 << 30 else { return .failure(.noBufferSpace) }
        return freeSlots.withLock { free in
            guard let slot = free.popLast() else { return .failure(.noBufferSpace) }
            let ret = csupport_register_slot(ring.pointer, UInt32(slot), base, count)
            if ret < 0 {
                free.append(slot)
                return .failure(errnoFromNegative(ret))
            }
            return .success(RegisteredSlot(index: slot))
        }
    }

    func unregister(_ slot: RegisteredSlot) {
        freeSlots.withLock { free in
            // In a child process the table is the parent's: leave it alone (csupport refuses).
            _ = csupport_register_slot(ring.pointer, UInt32(slot.index), nil, 0)
            free.append(slot.index)
        }
    }
}

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
