import Glibc

/// Peers are opt-in (--peers) and live outside this package graph: a Python script and a
/// separate SwiftNIO package under Benchmarks/.
func preparePeers(log: (String) -> Void) {}

func runPeer(_ c: BenchCase) throws -> CaseResult {
    throw BenchFailure("peer \(c.strategy) not available")
}
