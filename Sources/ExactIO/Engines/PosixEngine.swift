import SystemPackage

// The POSIX engine: read(2)/pread(2) with poll(2) for readiness, where io_uring is not used.

/// `read(2)` through swift-system, for when io_uring is unavailable or not wanted.
final class PosixEngine: IOEngine {
    let fd: FileDescriptor
    let syscalls: PosixSyscalls

    init(fd: FileDescriptor, syscalls: PosixSyscalls = .live) {
        self.fd = fd
        self.syscalls = syscalls
    }

    var kind: ExactReader.Backend { .posix }
    var degradation: String? { nil }

    func readiness() -> Readiness { syscalls.readiness(fd) }

    func read(
        into dst: UnsafeMutableRawBufferPointer, atLeast minimum: Int, slot: Int32, offset: Int64, deadline: Int64
    ) -> EngineResult {
        var result = EngineResult()
        // A request is capped at 1 GiB, as in the io_uring loop (the kernel caps one read at
        // about 2 GiB anyway).
        let maxRequest = 1 << 30
        while result.count < minimum {
            if deadline > 0 {
                // A blocking descriptor would wait in read(2) forever: wait in poll(2) with
                // what is left of the time instead.
                let left = deadline - monotonicNanoseconds()
                if left <= 0 {
                    result.error = .timedOut
                    return result
                }
                result.polls += 1
                switch syscalls.waitReadable(fd, left) {
                case .success(true): break
                case .success(false):
                    result.error = .timedOut
                    return result
                case .failure(let e):
                    result.error = e
                    return result
                }
            }
            let want = min(dst.count - result.count, maxRequest)
            let target = UnsafeMutableRawBufferPointer(rebasing: dst[result.count..<(result.count + want)])
            result.reads += 1
            let at = offset < 0 ? offset : offset + Int64(result.count)
            switch syscalls.read(fd, target, at) {
            case .success(0):
                return result
            case .success(let n):
                result.count += n
            case .failure(.interrupted):
                continue
            case .failure(let e) where e == .resourceTemporarilyUnavailable:
                if deadline > 0 { continue }  // the poll above waits, with the deadline
                result.polls += 1
                if case .failure(let e) = syscalls.waitReadable(fd, -1) {
                    result.error = e
                    return result
                }
            case .failure(let e):
                result.error = e
                return result
            }
        }
        return result
    }
}
