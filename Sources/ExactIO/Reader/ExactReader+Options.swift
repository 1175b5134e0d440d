import Logging

// ExactReader.Options, its validation, and Statistics.

extension ExactReader {
    /// Which I/O backend a reader uses.
    ///
    /// Before 1.0 a backend may be added; a `switch` over a `Backend` should end with
    /// `@unknown default:` (no warning today; an added case becomes a warning rather than a
    /// broken build). How a loop waits without io_uring is `IOLoop.EventInterface`, a struct
    /// that grows without breaking anything.
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

    /// Reader configuration. Every field has a default. Values are checked when a reader is
    /// created: one out of range makes the initializer throw `InvalidOptionError`.
    public struct Options: Sendable {
        /// Backend choice; default `.automatic`.
        public var backend: Backend
        /// Bytes of read-ahead staging (rounded up to the page size), 1 byte to 1 GiB; default
        /// 256 KiB. Small reads are served from it without a syscall; reads of at least a
        /// quarter of it go straight into the frame's own memory.
        public var stagingCapacity: Int
        /// Largest body `readFrame` accepts (`>= 0`); a longer length prefix throws
        /// `ExactReadError.frameTooLarge` before any memory is touched. Default 64 MiB.
        public var maxFrameLength: Int
        /// Bytes of memory this reader may register with io_uring for READ_FIXED (`>= 0`);
        /// `nil` (the default) means no limit of its own: registration then stops at the
        /// process-wide budget (half of RLIMIT_MEMLOCK for unprivileged users, the other half
        /// being kept for rings; 1 GiB for root). Past it, reads go to unregistered memory.
        public var registeredMemoryLimit: Int?
        /// The longest one call (`readFrame`, `readExactly`, `skip`, …) may wait for the
        /// descriptor, from the moment it is called; `nil` (the default) waits forever. When it
        /// passes, the call throws `Errno.timedOut` and the stream stays consistent, exactly as
        /// for any `Errno` (bytes that arrived stay buffered; `readFrame` consumes nothing).
        /// A deadline for the whole call, so a peer trickling one byte at a time cannot hold a
        /// read open. (`SO_RCVTIMEO` on the descriptor is not honoured by io_uring; use this.)
        public var readTimeout: Duration?
        /// Added to every decoded length prefix to get the body length, for protocols whose
        /// length counts more (a negative value: a header, a trailing checksum the body
        /// includes) or less (a positive value) than the body that follows the prefix; default
        /// 0. Netty's `LengthFieldBasedFrameDecoder` calls it `lengthAdjustment` and tokio's
        /// `LengthDelimitedCodec` `length_adjustment`; swift-nio's `LengthFieldBasedFrameDecoder`
        /// has no such parameter. Applies to `readFrame`, `withNextFrame` and `forEachFrame`
        /// (and to `AsyncExactReader`'s frames).
        public var lengthAdjustment: Int
        /// The length prefix counts its own bytes (the body is `length - prefixWidth`, for a
        /// varint the width it was encoded in); default false. Applied with
        /// `lengthAdjustment`. A length that leaves a negative body throws
        /// `ExactReadError.invalidLength`.
        public var lengthIncludesPrefix: Bool
        /// A logger for what operators may want to see. `ExactReader` logs its creation (backend,
        /// fallback reason, registration refusal) and every error one of its calls throws, at
        /// `debug`, and its large reads at `trace`. `AsyncExactReader` logs its creation only,
        /// at `debug` (its errors are not logged). Never on a per-frame path above `trace`; nil
        /// (the default) logs nothing.
        public var logger: Logger?
        /// Read a regular file with `O_DIRECT`: from the device into the reader's (registered,
        /// aligned) memory, bypassing the page cache, with no CPU copy for block-aligned reads.
        /// A descriptor opened with `O_DIRECT` is read that way whatever this says; with true,
        /// the reader also turns `O_DIRECT` on (`fcntl(F_SETFL)`) for a file opened without
        /// it. Where the filesystem refuses direct I/O, the reader reads through the page cache
        /// and `directIOFallbackReason` says why. Default false.
        public var directIO: Bool
        /// Regular files with io_uring: how many requests of 1 MiB a large read (2 MiB or more)
        /// keeps in flight at once, at explicit offsets, 1 to 64; 1 reads one request at a
        /// time. Default 4 (measured, see README "Files"). Streams always keep one request in
        /// flight: their bytes must land in order.
        public var queueDepth: Int

        /// Options with every field given or defaulted (see each field for its default and range).
        public init(
            backend: Backend = .automatic,
            stagingCapacity: Int = 256 << 10,
            maxFrameLength: Int = 64 << 20,
            registeredMemoryLimit: Int? = nil,
            readTimeout: Duration? = nil,
            lengthAdjustment: Int = 0,
            lengthIncludesPrefix: Bool = false,
            logger: Logger? = nil,
            directIO: Bool = false,
            queueDepth: Int = 4
        ) {
            self.backend = backend
            self.stagingCapacity = stagingCapacity
            self.maxFrameLength = maxFrameLength
            self.registeredMemoryLimit = registeredMemoryLimit
            self.readTimeout = readTimeout
            self.lengthAdjustment = lengthAdjustment
            self.lengthIncludesPrefix = lengthIncludesPrefix
            self.logger = logger
            self.directIO = directIO
            self.queueDepth = queueDepth
        }

        /// The largest staging capacity: the kernel registers at most 1 GiB per buffer.
        public static let maxStagingCapacity = 1 << 30

        /// Throws `InvalidOptionError` for the first field out of range.
        func validate() throws(InvalidOptionError) {
            if stagingCapacity < 1 || stagingCapacity > Self.maxStagingCapacity {
                throw InvalidOptionError(
                    option: "stagingCapacity", value: "\(stagingCapacity)",
                    requirement: "between 1 and \(Self.maxStagingCapacity) bytes")
            }
            if maxFrameLength < 0 {
                throw InvalidOptionError(option: "maxFrameLength", value: "\(maxFrameLength)", requirement: ">= 0")
            }
            if let limit = registeredMemoryLimit, limit < 0 {
                throw InvalidOptionError(option: "registeredMemoryLimit", value: "\(limit)", requirement: ">= 0 or nil")
            }
            if queueDepth < 1 || queueDepth > 64 {
                throw InvalidOptionError(option: "queueDepth", value: "\(queueDepth)", requirement: "between 1 and 64")
            }
            if let timeout = readTimeout, timeout <= .zero {
                throw InvalidOptionError(option: "readTimeout", value: "\(timeout)", requirement: "> 0 or nil")
            }
        }

        /// `readTimeout` in nanoseconds, or 0 for none.
        var timeoutNanoseconds: Int64 {
            guard let t = readTimeout else { return 0 }
            let (s, atto) = t.components
            let ns = s.multipliedReportingOverflow(by: 1_000_000_000)
            if ns.overflow { return .max / 2 }
            return max(1, ns.partialValue.addingReportingOverflow(atto / 1_000_000_000).partialValue)
        }
    }

    /// An `Options` value out of range, refused when the reader is created.
    public struct InvalidOptionError: Error, Sendable, Hashable, CustomStringConvertible {
        /// The field, e.g. `"stagingCapacity"`.
        public let option: String
        /// The value given, as text.
        public let value: String
        /// What the field accepts.
        public let requirement: String

        public var description: String {
            "ExactReader.Options.\(option) = \(value) is out of range: must be \(requirement)"
        }
    }

    /// Counters since the reader was created.
    public struct Statistics: Sendable, Hashable {
        /// Bytes handed to the caller: views (including an `incomplete` error's partial bytes,
        /// which are a length prefix's bytes when the stream ended inside one), caller buffers,
        /// and bytes lent to closures (`withExactly`, `withNextFrame`, `forEachFrame`). The
        /// length prefixes of frames that arrived whole and bytes discarded by `skip` are not
        /// counted.
        public var bytesDelivered = 0
        /// Bytes user space copied: staged bytes moved to the front of staging or into a new
        /// staging buffer, the staged prefix of a large read copied into the frame's memory,
        /// and staged bytes copied into caller buffers. The kernel's copy is not counted.
        public var bytesCopied = 0
        /// Read syscalls (POSIX) or io_uring read submissions.
        public var reads = 0
        /// The io_uring submissions among `reads` that targeted registered memory (READ_FIXED).
        public var fixedReads = 0
        /// Waits for readiness after EAGAIN or for a deadline (`poll(2)` or IORING_OP_POLL_ADD).
        public var polls = 0
        /// Reads served entirely from staging (or a received buffer) without a syscall or a
        /// copy: the fast path, including frames and bytes lent to closures in place.
        public var stagedViews = 0
        /// Large reads: reads that went straight into their final memory after the staged
        /// prefix.
        public var directReads = 0
        /// Bytes discarded by `skip`.
        public var bytesSkipped = 0

        /// All counters at zero.
        public init() {}
    }
}
