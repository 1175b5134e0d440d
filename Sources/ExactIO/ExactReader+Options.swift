extension ExactReader {
    /// Which I/O backend a reader uses.
    public enum Backend: Sendable, Hashable, CustomStringConvertible {
        /// io_uring when a ring can be created, else `read(2)`; the reason is in
        /// `fallbackReason`. The `EXACTIO_BACKEND` environment variable (`posix` or `uring`)
        /// overrides this choice, and only this one.
        case automatic
        /// io_uring, or the initializer throws the errno that prevented it.
        case ioUring
        /// `read(2)`.
        case posix

        public var description: String {
            switch self {
            case .automatic: "automatic"
            case .ioUring: "io_uring"
            case .posix: "posix"
            }
        }
    }

    /// Reader configuration. Every field has a default.
    public struct Options: Sendable {
        /// Backend choice; default `.automatic`.
        public var backend: Backend
        /// Bytes of read-ahead staging (rounded up to the page size, at least one page);
        /// default 256 KiB. Small reads are served from it without a syscall; reads of at
        /// least a quarter of it go straight into the frame's own memory.
        public var stagingCapacity: Int
        /// Largest body `readFrame` accepts; a longer length prefix throws
        /// `ExactReadError.frameTooLarge` before any memory is touched. Default 64 MiB.
        public var maxFrameLength: Int
        /// Bytes of memory the reader may register with io_uring for READ_FIXED; `nil` (the
        /// default) means RLIMIT_MEMLOCK for unprivileged users and 1 GiB for root.
        /// Past the budget, reads go to unregistered memory.
        public var registeredMemoryLimit: Int?
        /// With io_uring on a socket, a body of at least this many bytes going straight to
        /// its memory is read with one RECV+MSG_WAITALL instead of a loop of READ_FIXED/READ
        /// submissions (one per socket-buffer's worth). Default 4 MiB, where the bench
        /// measured the single submission ahead; `Int.max` turns it off.
        public var recvWaitAllThreshold: Int

        public init(
            backend: Backend = .automatic,
            stagingCapacity: Int = 256 << 10,
            maxFrameLength: Int = 64 << 20,
            registeredMemoryLimit: Int? = nil,
            recvWaitAllThreshold: Int = 4 << 20
        ) {
            precondition(stagingCapacity > 0, "stagingCapacity must be positive")
            precondition(maxFrameLength >= 0, "maxFrameLength must not be negative")
            precondition((registeredMemoryLimit ?? 0) >= 0, "registeredMemoryLimit must not be negative")
            self.backend = backend
            self.stagingCapacity = stagingCapacity
            self.maxFrameLength = maxFrameLength
            self.registeredMemoryLimit = registeredMemoryLimit
            self.recvWaitAllThreshold = recvWaitAllThreshold
        }
    }

    /// Counters since the reader was created.
    public struct Statistics: Sendable, Hashable {
        /// Bytes handed to the caller (views, caller buffers, `withExactly` bodies, frame
        /// prefixes); skipped bytes are not delivered.
        public var bytesDelivered = 0
        /// Bytes user space copied: staged bytes moved to the front of staging or into a new
        /// staging buffer, the staged prefix of a large read copied into the frame's memory,
        /// and staged bytes copied into caller buffers. The kernel's copy is not counted.
        public var bytesCopied = 0
        /// Read syscalls (POSIX) or io_uring submissions (reads and readiness polls).
        public var reads = 0
        /// The io_uring submissions among `reads` that targeted registered memory (READ_FIXED).
        public var fixedReads = 0
        /// Reads served entirely from staging without a syscall or a copy (the fast path).
        public var stagedViews = 0
        /// Reads that went straight into their final memory after the staged prefix.
        public var directReads = 0
        /// Bytes discarded by `skip`.
        public var bytesSkipped = 0

        public init() {}
    }
}
