import Synchronization

// What the server's tasks wait on: the stop (graceful shutdown, or a failed listener), and the
// count of handlers still running.

/// Fired once, when the server begins to shut down; tasks wait for it.
final class StopSignal: Sendable {
    private struct State {
        /// When it fired (nil: not yet).
        var firedAt: ContinuousClock.Instant? = nil
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextID = 0
    }
    private let state = Mutex(State())

    var isStopping: Bool { state.withLock { $0.firedAt != nil } }

    /// Fires (once; later calls do nothing) and wakes every waiter.
    func fire() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            guard s.firedAt == nil else { return [] }
            s.firedAt = .now
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for w in waiters { w.resume() }
    }

    /// The end of a grace period that starts when the signal fired (now, if it has not).
    func deadline(grace: Duration) -> ContinuousClock.Instant {
        state.withLock { s in
            if s.firedAt == nil { s.firedAt = .now }
            return s.firedAt! + grace
        }
    }

    /// Returns once the signal fired, or the task is cancelled.
    func wait() async {
        let id = state.withLock { s -> Int in
            s.nextID += 1
            return s.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.firedAt != nil || Task.isCancelled { return true }
                    s.waiters[id] = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }
}

/// Handlers running; waiters for none.
final class ActiveCount: Sendable {
    private struct State {
        var count = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextID = 0
    }
    private let state = Mutex(State())

    var count: Int { state.withLock { $0.count } }

    func enter() {
        state.withLock { $0.count += 1 }
    }

    func leave() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.count -= 1
            guard s.count == 0 else { return [] }
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for w in waiters { w.resume() }
    }

    /// True once no handler runs; false when `deadline` comes first (or the task is
    /// cancelled).
    func waitForZero(until deadline: ContinuousClock.Instant) async -> Bool {
        if count == 0 { return true }
        return await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await self.waitForZero()
                return self.count == 0
            }
            group.addTask {
                try? await Task.sleep(until: deadline, clock: .continuous)
                return self.count == 0
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
    }

    /// Returns once no handler runs, or the task is cancelled.
    private func waitForZero() async {
        let id = state.withLock { s -> Int in
            s.nextID += 1
            return s.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.count == 0 || Task.isCancelled { return true }
                    s.waiters[id] = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }
}
