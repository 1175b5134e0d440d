import Foundation

/// The JSON document (README "Benchmarks", JSON; version 2: every case has `connections`; extra
/// fields are additive).
struct Report: Codable {
    var version = 2
    var date: String
    var command: String
    var cases: [CaseResult]
}

/// Fills in each single-stream result's `floorRatio` and `ceilingRatio` from the `posix-into`
/// and `c-readahead` results of its transport and frame size.
func addRatios(_ results: inout [CaseResult]) {
    func rate(_ strategy: String, _ r: CaseResult) -> Double? {
        results.first { $0.strategy == strategy && $0.transport == r.transport && $0.frameBytes == r.frameBytes && $0.connections == 1 }?.gbPerSecond
    }
    for i in results.indices where results[i].connections == 1 && results[i].idle != true && results[i].many != true {
        let t = results[i].transport
        let floor = t == "tcp-to-file" ? "forward-readwrite" : t == "random" ? "c-pread" : "posix-into"
        // O_DIRECT: the ceiling is reads in flight (c-readahead-uring); positional reads: the C
        // pread loop; elsewhere the C read-ahead loop. tcp-to-file has none.
        let ceiling = t == "direct" ? "c-readahead-uring" : t == "tcp-to-file" ? "" : t == "random" ? "c-pread" : "c-readahead"
        results[i].floorRatio = rate(floor, results[i]).map { results[i].gbPerSecond / $0 }
        results[i].ceilingRatio = rate(ceiling, results[i]).map { results[i].gbPerSecond / $0 }
    }
    addManyRatios(&results)
    addServeRatios(&results)
}

/// Many-connection cases: CPU seconds per GiB, and GB/s and CPU per GiB as multiples of the best
/// one-thread C ceiling (by GB/s) of the same transport, frame size and connections.
func addManyRatios(_ results: inout [CaseResult]) {
    let many = results.indices.filter { results[$0].many == true && results[$0].idle != true && results[$0].serve == nil }
    for i in many {
        let gib = Double(results[i].frames) * Double(results[i].frameBytes) / Double(1 << 30)
        results[i].cpuSecondsPerGiB = gib > 0 ? (results[i].cpuUserSeconds + results[i].cpuSystemSeconds) / gib : nil
    }
    let groups = Dictionary(grouping: many) { "\(results[$0].transport)|\(results[$0].frameBytes)|\(results[$0].connections)" }
    for rows in groups.values {
        guard let best = rows.filter({ manyCeilingStrategies.contains(results[$0].strategy) })
            .max(by: { results[$0].gbPerSecond < results[$1].gbPerSecond })
        else { continue }
        let ceiling = results[best]
        for i in rows {
            results[i].ceilingStrategy = ceiling.strategy
            results[i].ceilingRatio = results[i].gbPerSecond / ceiling.gbPerSecond
            if let cpu = results[i].cpuSecondsPerGiB, let base = ceiling.cpuSecondsPerGiB, base > 0 {
                results[i].cpuCeilingRatio = cpu / base
            }
        }
    }
}

func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, width - s.count))
    return right ? fill + s : s + fill
}

func fmtBytes(_ b: Int) -> String {
    let d = Double(b)
    let m = Swift.abs(b)
    if m >= 1 << 30 { return String(format: "%.2f GiB", d / Double(1 << 30)) }
    if m >= 1 << 20 { return String(format: "%.1f MiB", d / Double(1 << 20)) }
    if m >= 1 << 10 { return String(format: "%.0f KiB", d / Double(1 << 10)) }
    return "\(b) B"
}

/// The stdout table: one block per transport and frame size, each strategy's GB/s as a ratio
/// to posix-into (×floor) and to c-readahead (×ceiling), peak growth in bytes and as a multiple of the frame.
func renderTable(_ results: [CaseResult]) -> String {
    var out = ""
    let many = results.filter { $0.many == true || $0.connections > 1 || $0.idle == true }
    let results = results.filter { r in !many.contains { $0.strategy == r.strategy && $0.transport == r.transport && $0.frameBytes == r.frameBytes && $0.connections == r.connections && $0.idle == r.idle } }
    let transports = allTransports.filter { t in results.contains { $0.transport == t } }
    let strategies = (allStrategies + peerStrategies)
    for t in transports {
        let sizes = Array(Set(results.filter { $0.transport == t }.map(\.frameBytes))).sorted()
        for n in sizes {
            let rows = results.filter { $0.transport == t && $0.frameBytes == n }
                .sorted { (strategies.firstIndex(of: $0.strategy) ?? 99) < (strategies.firstIndex(of: $1.strategy) ?? 99) }
            out += "\n\(t), \(sizeLabel(n)) frames\n"
            out += "  strategy            GB/s  (min-max)      ×floor  ×ceiling    frames/s      frames  seconds   peak growth   peak/frame   user s   sys s\n"
            for r in rows {
                let floor = r.floorRatio.map { String(format: "%6.2f", $0) } ?? "     -"
                let ceiling = r.ceilingRatio.map { String(format: "%8.2f", $0) } ?? "       -"
                out += "  " + pad(r.strategy, 18)
                    + String(format: " %6.2f ", r.gbPerSecond)
                    + pad(r.gbPerSecondMin.map { String(format: "(%.2f-%.2f)", $0, r.gbPerSecondMax ?? $0) } ?? "", 13)
                    + String(format: " %@  %@  %10.0f  %10d  %7.2f   ", floor, ceiling, r.framesPerSecond, r.frames, r.seconds)
                    + pad(fmtBytes(r.peakRSSBytes - r.baselineRSSBytes), 11, right: true)
                    + String(format: "   %9.2f×   %6.2f  %6.2f\n", r.peakOverFrame, r.cpuUserSeconds, r.cpuSystemSeconds)
            }
        }
    }
    return out + renderManyTable(many.filter { $0.serve == nil }) + renderServeTable(many.filter { $0.serve != nil })
}

/// The many-connection table: aggregate throughput; ratios to the best one-thread C ceiling of
/// the block, to SwiftNIO and tokio with the same thread count, and to `threads`; reader CPU per
/// GiB (and as a multiple of the ceiling's); memory per connection and syscalls per frame.
func renderManyTable(_ results: [CaseResult]) -> String {
    guard !results.isEmpty else { return "" }
    var out = ""
    let order = manyStrategies + manyPeerStrategies
    let groups = Dictionary(grouping: results.filter { $0.idle != true }) { "\($0.transport)|\($0.frameBytes)|\($0.connections)" }
    for key in groups.keys.sorted(by: { a, b in
        let x = a.split(separator: "|"), y = b.split(separator: "|")
        return (String(x[0]), Int(x[1])!, Int(x[2])!) < (String(y[0]), Int(y[1])!, Int(y[2])!)
    }) {
        let rows = groups[key]!.sorted { (order.firstIndex(of: $0.strategy) ?? 99) < (order.firstIndex(of: $1.strategy) ?? 99) }
        let first = rows[0]
        func rate(_ strategy: String) -> Double? { rows.first { $0.strategy == strategy }?.framesPerSecond }
        let threads = rate("threads")
        let ceiling = rows.compactMap(\.ceilingStrategy).first.map { " (ceiling: \($0))" } ?? " (no C ceiling in this run)"
        out += "\n\(first.transport), \(sizeLabel(first.frameBytes)) frames × \(first.frames) over \(first.connections) connections\(ceiling)\n"
        out += "  strategy        thr      GB/s  (min-max)        frames/s  ×ceiling   ×NIO  ×tokio  ×threads  CPU s/GiB  CPU×ceil   RSS/conn  syscalls/frame   user s   sys s\n"
        for r in rows {
            func ratio(_ base: Double?, _ width: Int) -> String {
                base.map { String(format: "%\(width).2f", r.framesPerSecond / $0) } ?? pad("-", width, right: true)
            }
            let k = manyThreadClass(r.strategy)
            out += "  " + pad(r.strategy, 15) + " " + pad(manyThreadsLabel(r.strategy, connections: r.connections), 6)
                + String(format: " %6.2f ", r.gbPerSecond)
                + pad(r.gbPerSecondMin.map { String(format: "(%.2f-%.2f)", $0, r.gbPerSecondMax ?? $0) } ?? "", 14)
                + String(format: " %10.0f  ", r.framesPerSecond)
                + (r.ceilingRatio.map { String(format: "%8.2f", $0) } ?? pad("-", 8, right: true))
                + "  " + ratio(rate("swift-nio-\(k)"), 5) + "  " + ratio(rate("tokio-\(k)"), 6) + "  " + ratio(threads, 8)
                + "  " + (r.cpuSecondsPerGiB.map { String(format: "%9.3f", $0) } ?? pad("-", 9, right: true))
                + "  " + (r.cpuCeilingRatio.map { String(format: "%8.2f", $0) } ?? pad("-", 8, right: true))
                + "  " + pad(fmtBytes(Int(r.rssPerConnection ?? 0)), 9, right: true)
                + "   " + pad(r.syscallsPerFrame.map { String(format: "%.4f", $0) } ?? "-", 14, right: true)
                + String(format: "   %6.2f  %6.2f\n", r.cpuUserSeconds, r.cpuSystemSeconds)
        }
    }
    if !groups.isEmpty {
        out += """

            thr: threads reading (1+pool: one loop, handlers on the global pool). ×ceiling: GB/s over the best \
            one-thread C row of the block (c-uring-recv, c-epoll, c-uring-mshot). ×NIO, ×tokio: frames/s over \
            swift-nio-N and tokio-N with N = 1 for the one-loop rows and 2 for group-uring, threads and the \
            two-thread peers. CPU s/GiB: the reader's user+sys seconds per GiB of bodies (peers: the peer \
            process); CPU×ceil: that over the ceiling row's.

            """
    }
    let idle = results.filter { $0.idle == true }
    if !idle.isEmpty {
        out += "\nidle connections (a read pending on each; kernel socket buffers aside)\n"
        out += "  strategy          connections   RSS/conn\n"
        for r in idle {
            out += "  " + pad(r.strategy, 15) + String(format: "   %9d   ", r.connections)
                + pad(fmtBytes(Int(r.rssPerConnection ?? 0)), 9, right: true) + "\n"
        }
    }
    return out
}

/// A self-contained SVG: for each transport, GB/s and peak/frame against frame size (log x),
/// one line per strategy.
func renderSVG(_ results: [CaseResult]) -> String {
    let transports = allTransports.filter { t in results.contains { $0.transport == t } }
    let strategies = (allStrategies + peerStrategies).filter { s in results.contains { $0.strategy == s } }
    let colors = ["#d62728", "#ff7f0e", "#bcbd22", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    let pw = 420.0, ph = 260.0, ml = 60.0, mt = 40.0, gap = 40.0
    let width = ml + 2 * (pw + gap) + 160
    let height = mt + Double(transports.count) * (ph + 70) + 20
    var svg = """
    <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="11">
    <rect width="100%" height="100%" fill="white"/>
    <text x="\(ml)" y="20" font-size="14">ExactIO bench: throughput and peak memory per frame size (log scale)</text>\n
    """
    let sizes = Array(Set(results.map(\.frameBytes))).sorted()
    guard let minN = sizes.first, let maxN = sizes.last else { return svg + "</svg>\n" }
    let lx0 = log2(Double(minN)), lx1 = max(log2(Double(maxN)), lx0 + 1)
    for (ti, t) in transports.enumerated() {
        let y0 = mt + Double(ti) * (ph + 70) + 20
        for (pi, metric) in ["GB/s", "peak / frame"].enumerated() {
            let x0 = ml + Double(pi) * (pw + gap)
            let rows = results.filter { $0.transport == t }
            func value(_ r: CaseResult) -> Double { pi == 0 ? r.gbPerSecond : max(r.peakOverFrame, 0) }
            // peak/frame for tiny frames is huge (a fixed overhead over a few bytes): clip at 8.
            let ymax = pi == 0 ? max(rows.map(value).max() ?? 1, 0.1) * 1.1 : 8.0
            svg += "<text x=\"\(x0)\" y=\"\(y0 - 6)\" font-size=\"12\">\(t): \(metric)\(pi == 1 ? " (clipped at 8×)" : "")</text>\n"
            svg += "<rect x=\"\(x0)\" y=\"\(y0)\" width=\"\(pw)\" height=\"\(ph)\" fill=\"none\" stroke=\"#999\"/>\n"
            for k in 0...4 {
                let v = ymax * Double(k) / 4, y = y0 + ph - ph * Double(k) / 4
                svg += "<line x1=\"\(x0)\" y1=\"\(y)\" x2=\"\(x0 + pw)\" y2=\"\(y)\" stroke=\"#eee\"/>"
                svg += "<text x=\"\(x0 - 4)\" y=\"\(y + 4)\" text-anchor=\"end\">\(String(format: "%.2g", v))</text>\n"
            }
            func px(_ n: Int) -> Double { x0 + (log2(Double(n)) - lx0) / (lx1 - lx0) * pw }
            func py(_ v: Double) -> Double { y0 + ph - min(v, ymax) / ymax * ph }
            for n in sizes {
                svg += "<text x=\"\(px(n))\" y=\"\(y0 + ph + 14)\" text-anchor=\"middle\">\(sizeLabel(n))</text>\n"
            }
            for (si, s) in strategies.enumerated() {
                let pts = rows.filter { $0.strategy == s }.sorted { $0.frameBytes < $1.frameBytes }
                guard !pts.isEmpty else { continue }
                let color = colors[si % colors.count]
                let path = pts.map { String(format: "%.1f,%.1f", px($0.frameBytes), py(value($0))) }.joined(separator: " ")
                svg += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(path)\"/>\n"
                for p in pts {
                    svg += String(format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%@\"/>", px(p.frameBytes), py(value(p)), color as NSString)
                }
                svg += "\n"
            }
        }
    }
    for (si, s) in strategies.enumerated() {
        let x = ml + 2 * (pw + gap), y = mt + 20 + Double(si) * 18
        svg += "<rect x=\"\(x)\" y=\"\(y - 9)\" width=\"12\" height=\"12\" fill=\"\(colors[si % colors.count])\"/>"
        svg += "<text x=\"\(x + 18)\" y=\"\(y + 1)\">\(s)</text>\n"
    }
    return svg + "</svg>\n"
}

/// The legend printed under the tables: the terms of the columns that appeared, and how far a
/// figure of this run can be trusted.
func renderLegend(_ results: [CaseResult], runsPerCase: Int, seconds: Double, summary: Bool) -> String {
    guard !results.isEmpty else { return "" }
    let single = results.contains { $0.many != true && $0.connections == 1 && $0.idle != true }
    var lines: [String] = ["", "Legend"]
    if single {
        lines += [
            "  ×floor     GB/s over posix-into, read(2) straight into one reused buffer: the kernel's one copy and",
            "             nothing else, the floor every reader pays (tcp-to-file: forward-readwrite; random: c-pread).",
            "  ×ceiling   GB/s over the C ceiling of the same block: single streams c-readahead (256 KiB reads into",
            "             one buffer, frames checked in place; direct: c-readahead-uring; random: c-pread).",
            "  seed-*     the naive readers ExactIO replaces: seed-join collects chunks then joins them (asyncio's",
            "             original), seed-buffer grows one buffer and copies each frame out (CPython today),",
            "             seed-prealloc preallocates n and fills it in place (the proposed fix; still a copy).",
            "  peak growth, peak/frame  the child's peak RSS (VmHWM) over its RSS when the case started, in bytes",
            "             and in frames: about 1× is the frame itself, 2× a second copy of it; small frames show",
            "             large multiples (fixed buffers over a few bytes), so read it at 1 MiB and up.",
        ]
    }
    if results.contains(where: { $0.many == true }) {
        lines += [
            "  many connections, reply, relay: ×ceiling is over the best one-thread C row of the block (named in",
            "             its heading), CPU×ceil the CPU per GiB over that row's; RSS/conn the peak growth per connection.",
        ]
    }
    let secs = String(format: "%.1f", seconds)
    let runs = runsPerCase == 1 ? "one run per case" : "\(runsPerCase) runs per case, the median shown"
    lines += [
        "  (min-max)  GB/s of the slowest and the fastest run of the case.",
        "  noise      \(runs) (single streams: about \(secs) s of frames per run), each run in a fresh",
        "             process, its writer in another on the same \(ProcessInfo.processInfo.activeProcessorCount) cores: runs of one case differ by",
        "             10-20 % and more. Compare rows within one invocation; quote figures from --repeat N --seconds S.",
    ]
    if summary {
        lines.append("  This was the summary (a few cases per family); --all runs the full matrix, --help says what is in each.")
    }
    return lines.joined(separator: "\n")
}
