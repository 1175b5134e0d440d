import ExactIOBenchCeiling

/// What one benchmark case is: a strategy reading frames of one size over one transport.
struct BenchCase: Hashable, Codable {
    var strategy: String
    var transport: String
    var frameBytes: Int
    var frames: Int
    /// Connections read at once (1: the single-stream cases).
    var connections: Int = 1
    /// The idle-memory case: every connection with a read pending, then one frame each.
    var idle: Bool = false
    /// A many-connection case (Many.swift), even with one connection: the reader child accepts
    /// the writer's connections and reads them with a many-connection strategy or peer.
    var many: Bool = false

    var name: String {
        let base = "\(strategy)/\(transport)/\(sizeLabel(frameBytes))"
        if idle { return base + "/idle\(connections)" }
        return many || connections > 1 ? base + "/x\(connections)" : base
    }
}

/// Every reader strategy, in table order: the naive ones, the floor, the C ceiling, ExactIO.
let allStrategies = [
    "seed-join", "seed-buffer", "seed-prealloc", "posix-into", "c-readahead", "c-readahead-uring",
    "exactio-posix", "exactio-uring", "exactio-borrow",
]
/// Strategies that need io_uring: left out where a ring cannot be created.
let uringOnlyStrategies = ["c-readahead-uring"]
/// Peer strategies (opt-in with --peers): processes of their own, not in this executable.
let peerStrategies = ["py-asyncio", "swift-nio"]
let allTransports = ["unix", "tcp", "pipe", "file", "direct", "tcp-to-file", "random"]
/// `direct`: the frame file opened with O_DIRECT (written and fsynced first, 1 GiB per case).
/// The naive strategies read unaligned and cannot run there; `posix-into` (the floor) and
/// `c-readahead` become one aligned `pread` per frame, `c-readahead-uring` 1 MiB READ_FIXED
/// chunks with up to 64 in flight (the ceiling).
let directStrategies = ["posix-into", "c-readahead-uring", "exactio-posix", "exactio-uring", "exactio-borrow"]
let directSizes = [1 << 20, 64 << 20, 512 << 20]
/// `tcp-to-file`: each frame's body goes from a TCP socket to a file in /dev/shm (4 GiB per
/// case): `forward-readwrite` (read(2) into a 256 KiB buffer, write(2); the floor),
/// `forward-seed` (seed-prealloc's readexactly, then one write per frame), `exactio-forward-posix`
/// (`ExactReader.forward` on the POSIX backend: splice(2) through a pipe), `exactio-forward`
/// (the default backend: IORING_OP_SPLICE where io_uring works).
let forwardStrategies = ["forward-readwrite", "forward-seed", "exactio-forward-posix", "exactio-forward"]
let forwardSizes = [64 << 20, 1 << 30]
/// `random`: positional reads of 4 KiB records at random offsets (splitmix64) of a 1 GiB file in
/// the page cache: `c-pread` (a C pread(2) loop into one buffer; floor and ceiling),
/// `exactio-pread-posix` and `exactio-pread-uring` (`readExactly(_:at:)`, each record a view).
let randomStrategies = ["c-pread", "exactio-pread-posix", "exactio-pread-uring"]
let randomFileBytes = 1 << 30
let allSizes = [64, 4 << 10, 64 << 10, 1 << 20, 64 << 20, 512 << 20]

/// Bytes of frame bodies of a case's first (calibration) run; the measured runs then move
/// enough frames to last `--seconds` (see `scaledFrames`).
func bodyBytes(frameBytes n: Int, quick: Bool) -> Int {
    switch n {
    case ..<1024: quick ? 8 << 20 : 16 << 20
    case ..<(64 << 10): quick ? 256 << 20 : 512 << 20
    case ..<(1 << 20): 1 << 30
    case ..<(512 << 20): quick ? 512 << 20 : 1 << 30
    default: 1 << 30  // two 512 MiB frames (reserve() keeps the first from paying page faults)
    }
}

func makeCases(quick: Bool, peers: Bool, filter: [String]) -> [BenchCase] {
    let transports = quick ? ["unix", "tcp"] : allTransports
    let sizes = quick ? [4 << 10, 1 << 20, 64 << 20] : allSizes
    let uring = exio_ceiling_uring_available() != 0
    let strategies = allStrategies.filter { uring || !uringOnlyStrategies.contains($0) } + (peers ? peerStrategies : [])
    var cases: [BenchCase] = []
    for t in transports + (quick ? [] : []) {
        let sizes = t == "direct" ? directSizes : t == "tcp-to-file" ? forwardSizes : t == "random" ? [4 << 10] : sizes
        let strategies = t == "direct"
            ? directStrategies.filter { uring || !uringOnlyStrategies.contains($0) }
            : t == "tcp-to-file" ? forwardStrategies : t == "random" ? randomStrategies : strategies
        for n in sizes {
            for s in strategies {
                // The peers read sockets only (asyncio streams, NIO channels).
                if peerStrategies.contains(s) && !(t == "unix" || t == "tcp") { continue }
                let total = t == "tcp-to-file" ? 4 << 30 : t == "direct" ? 1 << 30 : t == "random" ? 256 << 20
                    : bodyBytes(frameBytes: n, quick: quick)
                let frames = max(2, total / n)
                let c = BenchCase(strategy: s, transport: t, frameBytes: n, frames: frames)
                if filter.isEmpty || filter.allSatisfy({ f in c.name.contains(f) }) { cases.append(c) }
            }
        }
    }
    return cases
}

/// The frames a case needs to run for `seconds`, from a calibration run that read `frames` in
/// `took` seconds (never fewer than it read). A file case's file stays under 8 GiB.
func scaledFrames(_ c: BenchCase, took: Double, seconds: Double) -> Int {
    guard took > 0, took < seconds else { return c.frames }
    let wanted = Double(c.frames) * seconds / took
    if c.transport == "direct" || c.transport == "tcp-to-file" { return c.frames }  // fixed: 1 GiB, 4 GiB
    if c.transport == "random" { return max(c.frames, Int((Double(c.frames) * seconds / took).rounded(.up))) }
    let maxBytes = c.transport == "file" ? Double(8 << 30) : Double(64 << 30)
    let cap = maxBytes / Double(c.frameBytes + 4)
    return max(c.frames, Int(min(wanted, cap).rounded(.up)))
}

func sizeLabel(_ n: Int) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 { return "\(n >> 20)MiB" }
    if n >= 1 << 10 && n % (1 << 10) == 0 { return "\(n >> 10)KiB" }
    return "\(n)B"
}

/// The body every writer sends: first byte 0x11, last byte 0x22 (n >= 2), the rest 0x33.
/// Readers check the length and these marks on every frame.
enum Marks {
    static let first: UInt8 = 0x11
    static let last: UInt8 = 0x22
    static let fill: UInt8 = 0x33

    /// The 4-byte big-endian length prefix.
    static func header(_ n: Int) -> [UInt8] {
        [UInt8(n >> 24 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
    }

    /// A whole frame of `n` body bytes: prefix, then the marked body.
    static func frame(_ n: Int) -> [UInt8] {
        var b = [UInt8](repeating: fill, count: n)
        if n >= 1 { b[0] = first }
        if n >= 2 { b[n - 1] = last }
        return header(n) + b
    }

    @inline(__always)
    static func check(_ body: UnsafeRawBufferPointer, _ n: Int) -> Bool {
        guard body.count == n else { return false }
        if n == 0 { return true }
        if body[0] != first { return false }
        if n >= 2 && body[n - 1] != last { return false }
        if n >= 3 && body[n / 2] != fill { return false }
        return true
    }
}

/// The summary (`bench` with no options; one to three minutes on a 2-core machine): a few cases
/// of each family with the rows they are measured against. Single streams: every strategy over
/// unix at 4 KiB (read-ahead) and 64 MiB (peak memory: n against 2n) and over tcp at 1 MiB;
/// 256 TCP connections at 4 KiB (the three C ceilings, the loop on both backends, threads);
/// the serving cases reply and relay (their C ceilings, the loop, threads); positional 4 KiB
/// reads (the C pread loop, ExactIO). With --peers, the peers of those families.
func makeSummaryCases(peers: Bool) -> [BenchCase] {
    let uring = exio_ceiling_uring_available() != 0
    func keep(_ s: String) -> Bool {
        uring || !(uringOnlyStrategies + manyURingOnlyStrategies + serveURingOnlyStrategies).contains(s)
    }
    let single = makeCases(quick: true, peers: peers, filter: []).filter { c in
        [("unix", 4 << 10), ("unix", 64 << 20), ("tcp", 1 << 20)].contains { $0 == (c.transport, c.frameBytes) }
    }
    let manyRows = ["c-uring-recv", "c-epoll", "c-uring-mshot", "loop-uring", "loop-uring-exec", "loop-epoll-exec", "threads"]
        + (peers ? ["swift-nio-1", "swift-nio-2"] : [])
    let many = makeManyCases(quick: true, peers: peers, filter: []).filter { manyRows.contains($0.strategy) }
    let serveRows = ["reply-c", "reply-loop-uring", "reply-loop-uring-exec", "reply-loop-epoll-exec", "reply-threads",
                     "relay-c", "relay-loop-uring", "relay-loop-epoll", "relay-threads"]
        + (peers ? ["reply-swift-nio-1"] : [])
    let serve = makeServeCases(quick: true, peers: peers, filter: []).filter { serveRows.contains($0.strategy) }
    let random = ["c-pread", "exactio-pread-uring", "exactio-pread-posix"].map {
        BenchCase(strategy: $0, transport: "random", frameBytes: 4 << 10, frames: (256 << 20) / (4 << 10))
    }
    return (single + many + serve + random).filter { keep($0.strategy) }
}
