import Foundation
import Glibc

// bench: every strategy side by side, each case in a fresh child process with the writer in
// another process. See README "Benchmarks".
//
//   swift run -c release bench [--quick] [--filter TEXT]... [--json FILE] [--svg FILE] [--peers]
//
// Internal modes: --child STRATEGY TRANSPORT BYTES FRAMES (one case; prints its JSON result),
//                 --writer TRANSPORT BYTES FRAMES [--port P | --path FILE] (the writer process).

// stdout carries only the final table and JSON-free output; progress goes to stderr (unbuffered).

func usage() -> Never {
    FileHandle.standardError.write("""
    usage: bench [--quick] [--filter TEXT]... [--json FILE] [--svg FILE] [--peers] [--list]
      --quick        unix and tcp at 4 KiB, 1 MiB and 64 MiB, every strategy (under a minute)
      --filter TEXT  only cases whose name strategy/transport/size contains TEXT (repeatable: all must match)
      --strategy S   only strategy S (repeatable: any of them)
      --json FILE    write the results as JSON (schema in README "Benchmarks")
      --svg FILE     write a chart (GB/s and peak/frame against frame size)
      --peers        also run CPython asyncio readexactly and SwiftNIO's LengthFieldBasedFrameDecoder
      --repeat N     run each case N times (fresh processes) and report the median by GB/s (default 3;
                     1 with --quick)
      --seconds S    how long each single-stream case runs: a first run calibrates the frame count
                     (default 1.5; 0.3 with --quick)
      --list         print the cases and exit
      --soak MINUTES mixed 0 B-16 MiB frames over unix and tcp on both backends, views held at random,
                     every frame verified, RSS sampled each second; fails if RSS keeps growing

    """.data(using: .utf8)!)
    exit(2)
}

var args = Array(CommandLine.arguments.dropFirst())

if args.first == "--writer" {
    guard args.count >= 4, let n = Int(args[2]), let frames = Int(args[3]) else { usage() }
    var port: UInt16? = nil
    var path: String? = nil
    if let i = args.firstIndex(of: "--port"), i + 1 < args.count { port = UInt16(args[i + 1]) }
    if let i = args.firstIndex(of: "--path"), i + 1 < args.count { path = args[i + 1] }
    do {
        try runWriter(transport: args[1], n: n, frames: frames, port: port, path: path)
        exit(0)
    } catch {
        FileHandle.standardError.write("writer: \(error)\n".data(using: .utf8)!)
        exit(1)
    }
}

if args.first == "--soak-writer" {
    guard args.count >= 3, let seed = UInt64(args[2]) else { usage() }
    var port: UInt16? = nil
    if let i = args.firstIndex(of: "--port"), i + 1 < args.count { port = UInt16(args[i + 1]) }
    do { try runSoakWriter(transport: args[1], seed: seed, port: port) } catch {
        FileHandle.standardError.write("soak writer: \(error)\n".data(using: .utf8)!)
        exit(1)
    }
}

if args.first == "--soak" {
    guard args.count >= 2, let minutes = Double(args[1]), minutes > 0 else { usage() }
    #if DEBUG
    FileHandle.standardError.write("WARNING: debug build; use swift run -c release bench --soak\n".data(using: .utf8)!)
    #endif
    exit(runSoak(minutes: minutes, log: { FileHandle.standardError.write(($0 + "\n").data(using: .utf8)!) }) ? 0 : 1)
}

if args.first == "--many-writer" {
    guard args.count >= 5, let n = Int(args[2]), let conns = Int(args[3]), let frames = Int(args[4]) else { usage() }
    var port: UInt16? = nil
    var path: String? = nil
    if let i = args.firstIndex(of: "--port"), i + 1 < args.count { port = UInt16(args[i + 1]) }
    if let i = args.firstIndex(of: "--path"), i + 1 < args.count { path = args[i + 1] }
    do {
        try runManyWriter(transport: args[1], n: n, connections: conns, frames: frames, idle: args.contains("--idle"), port: port, path: path)
        exit(0)
    } catch {
        FileHandle.standardError.write("many writer: \(error)\n".data(using: .utf8)!)
        exit(1)
    }
}

if args.first == "--child" {
    guard args.count >= 5, let n = Int(args[3]), let frames = Int(args[4]) else { usage() }
    var c = BenchCase(strategy: args[1], transport: args[2], frameBytes: n, frames: frames)
    if args.count >= 6, let conns = Int(args[5]) { c.connections = conns }
    if args.count >= 7 { c.idle = args[6] == "idle" }
    do {
        let r: CaseResult
        if c.connections > 1 || manyStrategies.contains(c.strategy) || c.idle {
            r = try runManyCase(c)
        } else if peerStrategies.contains(c.strategy) {
            r = try runPeer(c)
        } else {
            r = try runCase(c)
        }
        let data = try JSONEncoder().encode(r)
        print(String(decoding: data, as: UTF8.self))
        exit(0)
    } catch {
        FileHandle.standardError.write("case \(c.name): \(error)\n".data(using: .utf8)!)
        exit(1)
    }
}

var quick = false, peers = false, list = false
var repeats: Int? = nil
var targetSeconds: Double? = nil
var filters: [String] = []
var onlyStrategies: [String] = []
var jsonPath: String? = nil, svgPath: String? = nil
var i = 0
while i < args.count {
    switch args[i] {
    case "--quick": quick = true
    case "--peers": peers = true
    case "--list": list = true
    case "--filter": i += 1; if i < args.count { filters.append(args[i]) } else { usage() }
    case "--strategy": i += 1; if i < args.count { onlyStrategies.append(args[i]) } else { usage() }
    case "--json": i += 1; if i < args.count { jsonPath = args[i] } else { usage() }
    case "--svg": i += 1; if i < args.count { svgPath = args[i] } else { usage() }
    case "--repeat": i += 1; if i < args.count, let r = Int(args[i]), r >= 1 { repeats = r } else { usage() }
    case "--seconds": i += 1; if i < args.count, let t = Double(args[i]), t > 0 { targetSeconds = t } else { usage() }
    case "-h", "--help": usage()
    default:
        FileHandle.standardError.write("unknown argument \(args[i])\n".data(using: .utf8)!)
        usage()
    }
    i += 1
}

func log(_ s: String) { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }

#if DEBUG
log("WARNING: this is a debug build; its figures are meaningless. Use: swift run -c release bench")
#endif

let cases = (makeCases(quick: quick, peers: peers, filter: filters) + makeManyCases(quick: quick, peers: peers, filter: filters))
    .filter { onlyStrategies.isEmpty || onlyStrategies.contains($0.strategy) }
if list {
    for c in cases { print("\(c.name) × \(c.frames)") }
    exit(0)
}
if cases.isEmpty {
    log("no case matches the filter")
    exit(2)
}
if peers { preparePeers(log: log) }

let runsPerCase = repeats ?? (quick ? 1 : 3)
let caseSeconds = targetSeconds ?? (quick ? 0.3 : 1.5)
let start = now()
var results: [CaseResult] = []
var failures: [String] = []
for (k, planned) in cases.enumerated() {
    let t0 = now()
    FileHandle.standardError.write((String(format: "[%3d/%d %6.1fs] ", k + 1, cases.count, t0 - start) + pad(planned.name, 40)).data(using: .utf8)!)
    var c = planned
    var runs: [CaseResult] = []
    var lastStatus: Int32 = 0
    if c.connections == 1 && !manyStrategies.contains(c.strategy) {
        // Calibration: a short run says how many frames last `caseSeconds` (start-up and the
        // writer's start must not shape the figure).
        guard let (status, r) = runChild(c), let r else {
            failures.append(c.name)
            log("FAILED in calibration")
            continue
        }
        lastStatus = status
        c.frames = scaledFrames(c, took: r.seconds, seconds: caseSeconds)
    }
    for _ in 0..<runsPerCase {
        guard let (status, r) = runChild(c) else { break }
        lastStatus = status
        if let r { runs.append(r) } else { break }
    }
    if runs.count == runsPerCase {
        runs.sort { $0.gbPerSecond < $1.gbPerSecond }
        var r = runs[runs.count / 2]
        r.runs = runs.count
        r.gbPerSecondMin = runs.first!.gbPerSecond
        r.gbPerSecondMax = runs.last!.gbPerSecond
        results.append(r)
        log(String(format: "%6.2f GB/s [%.2f-%.2f]  peak %.2f× frame  %.2fs/run  (%.1fs)", r.gbPerSecond, r.gbPerSecondMin!, r.gbPerSecondMax!, r.peakOverFrame, r.seconds, now() - t0))
    } else {
        failures.append(c.name)
        log("FAILED (exit \(lastStatus))")
    }
}

/// Runs one case in a fresh child; returns its exit status and result.
func runChild(_ c: BenchCase) -> (Int32, CaseResult?)? {
    var p: [Int32] = [0, 0]
    pipe(&p)
    let pid: pid_t
    do {
        pid = try spawn(
            selfPath,
            ["--child", c.strategy, c.transport, String(c.frameBytes), String(c.frames), String(c.connections), c.idle ? "idle" : "busy"],
            stdoutFD: p[1])
    } catch {
        log("spawn failed: \(error)")
        return nil
    }
    close(p[1])
    let out = readToEnd(closing: p[0])
    let status = waitExit(pid)
    return (status, status == 0 ? try? JSONDecoder().decode(CaseResult.self, from: Data(out)) : nil)
}

addRatios(&results)
print(renderTable(results))
let command = (["swift run -c release bench"] + CommandLine.arguments.dropFirst()).joined(separator: " ")
if let jsonPath {
    let iso = ISO8601DateFormatter().string(from: Date())
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data = try enc.encode(Report(date: iso, command: command, cases: results))
    try data.write(to: URL(fileURLWithPath: jsonPath))
    log("wrote \(jsonPath)")
}
if let svgPath {
    try renderSVG(results).write(toFile: svgPath, atomically: true, encoding: .utf8)
    log("wrote \(svgPath)")
}
log(String(format: "%d cases in %.1fs%@", results.count, now() - start, failures.isEmpty ? "" : "; failed: \(failures.joined(separator: ", "))" as NSString))
exit(failures.isEmpty ? 0 : 1)
