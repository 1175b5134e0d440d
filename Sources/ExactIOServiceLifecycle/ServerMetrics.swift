import Metrics
import ExactIO
import Synchronization

// The server's metrics: the loops' counters (IOLoop.statistics) as swift-metrics counters,
// and the server's own connection counts.

/// The metrics of one run of a server (labels in `ExactIOServer`'s documentation).
final class ServerMetrics: Sendable {
    private let factory: any MetricsFactory
    private let prefix: String
    private let accepts: Counter
    private let failures: Counter
    private let cancellations: Counter
    private let active: Meter
    /// Per loop: its counters, and the statistics reported last (the counters grow by the
    /// difference).
    private let loops = Mutex<[LoopCounters]>([])

    private struct LoopCounters {
        let enters, reads, completions, wakeups, starvations: Counter
        var last = IOLoop.Statistics()
    }

    init(_ configuration: ExactIOServer.Configuration) {
        factory = configuration.metricsFactory ?? MetricsSystem.factory
        prefix = configuration.metricsLabelPrefix
        accepts = Counter(label: "\(prefix)_connections_accepted", factory: factory)
        failures = Counter(label: "\(prefix)_connection_failures", factory: factory)
        cancellations = Counter(label: "\(prefix)_connections_cancelled", factory: factory)
        active = Meter(label: "\(prefix)_connections_active", factory: factory)
    }

    func accepted() {
        accepts.increment()
        active.increment()
    }

    func ended() {
        active.decrement()
    }

    func failed() {
        failures.increment()
    }

    func cancelled(_ handlers: Int) {
        cancellations.increment(by: handlers)
    }

    /// Adds what each loop counted since the last report.
    func report(_ group: [IOLoop]) {
        loops.withLock { loops in
            while loops.count < group.count {
                let dimensions = [("loop", "\(loops.count)")]
                func counter(_ name: String) -> Counter {
                    Counter(label: "\(prefix)_loop_\(name)", dimensions: dimensions, factory: factory)
                }
                loops.append(LoopCounters(
                    enters: counter("enters"), reads: counter("reads"), completions: counter("completions"),
                    wakeups: counter("wakeups"), starvations: counter("starvations")))
            }
            for (i, loop) in group.enumerated() {
                let now = loop.statistics
                let last = loops[i].last
                loops[i].enters.increment(by: max(0, now.enters - last.enters))
                loops[i].reads.increment(by: max(0, now.reads - last.reads))
                loops[i].completions.increment(by: max(0, now.completions - last.completions))
                loops[i].wakeups.increment(by: max(0, now.wakeups - last.wakeups))
                loops[i].starvations.increment(by: max(0, now.starvations - last.starvations))
                loops[i].last = now
            }
        }
    }
}
