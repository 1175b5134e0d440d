import SystemPackage

// Why io_uring, or part of it, is not used by a reader: the step that failed and its errno.

extension ExactReader {
    /// Why io_uring, or part of it, is not used, as values a program can act on: the step that
    /// failed, its errno when there is one, and the sentence `fallbackReason` shows.
    ///
    /// ```swift
    /// if let why = reader.fallback, why.step == .ringSetup, why.errno == .notPermitted {
    ///     log("io_uring is blocked here (seccomp or sysctl): \(why)")
    /// }
    /// ```
    public struct FallbackReason: Sendable, Hashable, CustomStringConvertible {
        /// Where io_uring was given up.
        ///
        /// Before 1.0, minor versions may add steps (a new requirement that io_uring can fail).
        /// Compare with `==` for the steps you act on, or end a `switch` over a `Step` with
        /// `@unknown default:`: it compiles without a warning today, and when a step is added
        /// the compiler warns about it instead of the build failing.
        public enum Step: Sendable, Hashable {
            /// `EXACTIO_BACKEND=posix` chose `read(2)` for an `.automatic` reader.
            case forcedByEnvironment
            /// `EXACTIO_BACKEND` had a value that is not understood and was ignored (io_uring
            /// may still be in use).
            case environmentIgnored
            /// `io_uring_setup` failed (seccomp, the `kernel.io_uring_disabled` sysctl,
            /// RLIMIT_MEMLOCK, the descriptor limit, a kernel without io_uring).
            case ringSetup
            /// Probing the ring's operations failed.
            case probe
            /// The kernel lacks an operation ExactIO needs (READ, POLL_ADD, LINK_TIMEOUT,
            /// ASYNC_CANCEL; or READ_FIXED, for registered buffers only).
            case missingOperations
            /// io_uring is used, but reads go to unregistered memory: registration failed or was
            /// refused (RLIMIT_MEMLOCK, the process-wide budget, `registeredMemoryLimit`).
            case bufferRegistration
            /// This process inherited the reader's ring through `fork()`: it reads with
            /// `read(2)`.
            case inheritedThroughFork
            /// This build of ExactIO has no io_uring part: built with the `IOUring` package trait
            /// off (`traits: []` in a dependent's manifest, `--disable-default-traits`), with
            /// `EXACTIO_NO_URING=1`, or for a platform other than Linux. No liburing needed.
            case notInThisBuild
        }

        /// Where io_uring was given up.
        public let step: Step
        /// The errno of the failed call, when a call failed (nil for a refusal by policy).
        public let errno: Errno?
        /// The sentence `ExactReader.fallbackReason` shows.
        public let description: String

        /// A reason from its parts (ExactIO makes these; public for tests and wrappers).
        public init(step: Step, errno: Errno?, description: String) {
            self.step = step
            self.errno = errno
            self.description = description
        }
    }
}
