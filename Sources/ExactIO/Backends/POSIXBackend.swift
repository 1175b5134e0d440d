import SystemPackage

/// `read(2)` through swift-system, for when io_uring is unavailable or not wanted.
final class PosixEngine: IOEngine {
    let fd: FileDescriptor
    let syscalls: PosixSyscalls

    init(fd: FileDescriptor, syscalls: PosixSyscalls = .live) {
        self.fd = fd
        self.syscalls = syscalls
    }

    var kind: ExactReader.Backend { .posix }

    func isReadableNow() -> Bool { syscalls.isReadableNow(fd) }

    func read(
        into dst: UnsafeMutableRawBufferPointer,
        atLeast minimum: Int,
        slot: Int32,
        exact: Bool,
        statistics: inout ExactReader.Statistics
    ) -> (count: Int, error: Errno?) {
        var got = 0
        // A request is capped at 1 GiB, as in the io_uring loop (the kernel caps one read at
        // about 2 GiB anyway).
        let maxRequest = 1 << 30
        while got < minimum {
            let want = min(dst.count - got, maxRequest)
            let target = UnsafeMutableRawBufferPointer(rebasing: dst[got..<(got + want)])
            statistics.reads += 1
            switch syscalls.read(fd, target) {
            case .success(0):
                return (got, nil)
            case .success(let n):
                got += n
            case .failure(.interrupted):
                continue
            case .failure(let e) where e == .resourceTemporarilyUnavailable:
                if case .failure(let e) = syscalls.waitReadable(fd) { return (got, e) }
            case .failure(let e):
                return (got, e)
            }
        }
        return (got, nil)
    }
}
