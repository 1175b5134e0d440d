import Synchronization

// RegistrationBudget: pinned memory and rings across the process (RLIMIT_MEMLOCK's share).

/// Registered (pinned) memory and io_uring rings across the whole process.
///
/// The kernel charges both to `RLIMIT_MEMLOCK` for users without `CAP_IPC_LOCK`: every ring
/// costs two pages, every registered buffer its pages, and the count is per user (shared by
/// all of the user's processes), released asynchronously after a ring closes. Registration
/// is therefore budgeted for the whole process, at half the limit, so that registered buffers
/// can never starve later readers of their rings (8 MiB of `RLIMIT_MEMLOCK`: 4 MiB of buffers,
/// and room for 512 rings). Root is not limited by the kernel; its budget is 1 GiB, so that
/// pinned memory stays bounded.
final class RegistrationBudget: Sendable {
    static let shared = RegistrationBudget()

    private struct State {
        var registeredBytes = 0
        var registrants = 0  // pools with registered memory
    }
    private let state = Locked(State())
    /// io_uring rings open in this process (ExactIO's).
    let openRings = Atomic<Int>(0)

    static let rootBudget = 1 << 30

    /// RLIMIT_MEMLOCK in bytes; nil when unlimited.
    static func memlockLimit() -> Int? {
        var rl = rlimit()
        guard getrlimit(Platform.memlockResource, &rl) == 0, rl.rlim_cur != rlim_t.max else { return nil }
        return Int(clamping: rl.rlim_cur)
    }

    /// True when the kernel does not charge this process's pinned memory (root, or
    /// RLIMIT_MEMLOCK unlimited).
    static var isUnlimited: Bool { geteuid() == 0 || memlockLimit() == nil }

    /// The process-wide registration budget in bytes.
    var limit: Int {
        if RegistrationBudget.isUnlimited { return RegistrationBudget.rootBudget }
        return (RegistrationBudget.memlockLimit() ?? 0) / 2
    }

    var registeredBytes: Int { state.withLock { $0.registeredBytes } }

    /// Claims `bytes` of the budget; false (nothing claimed) when they do not fit.
    func claim(_ bytes: Int) -> Bool {
        let limit = self.limit
        return state.withLock { s in
            guard bytes <= limit - s.registeredBytes else { return false }
            s.registeredBytes += bytes
            return true
        }
    }

    func release(_ bytes: Int) {
        state.withLock { $0.registeredBytes -= bytes }
    }

    /// "4096 KiB of 4096 KiB (half of RLIMIT_MEMLOCK 8192 KiB; the other half is kept for
    /// rings); 12 rings open": what the budget is, what is used, by whom.
    func describe() -> String {
        let used = registeredBytes >> 10
        let rings = openRings.load(ordering: .relaxed)
        let source: String
        if RegistrationBudget.isUnlimited {
            source = "ExactIO's cap for processes the kernel does not limit"
        } else {
            source = "half of RLIMIT_MEMLOCK \(memlockDescription()); the other half is kept for rings"
        }
        return "this process has \(used) KiB of buffers registered, budget \(limit >> 10) KiB (\(source)); "
            + "\(rings) ExactIO ring\(rings == 1 ? "" : "s") open"
    }
}

/// RLIMIT_MEMLOCK as text ("8192 KiB", "unlimited").
func memlockDescription() -> String {
    guard let limit = RegistrationBudget.memlockLimit() else { return "unlimited" }
    return "\(limit >> 10) KiB"
}
