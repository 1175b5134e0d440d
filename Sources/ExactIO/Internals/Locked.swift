
// Locked: a value behind a pthread mutex (seen by ThreadSanitizer, unlike futex-based Mutex).

/// A value behind a pthread mutex, for state shared between a reader, its views and a loop.
///
/// Why not Synchronization's `Mutex`: on Linux it locks with futexes that ThreadSanitizer does
/// not see, so every access it protects is reported as a race (the CI runs the suite under
/// TSan); pthread mutexes are intercepted and understood. Same shape: `withLock`.
final class Locked<Value>: @unchecked Sendable {
    // @unchecked Sendable: `value` is only touched inside `withLock`, under `mutex`.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @exclusivity(unchecked) private var value: Value

    init(_ value: Value) {
        self.mutex = .allocate(capacity: 1)
        self.mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        self.value = value
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

