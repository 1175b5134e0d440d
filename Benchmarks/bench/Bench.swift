import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// bench: every strategy side by side, each case in a fresh child process with the writer in
// another process. See README "Benchmarks" and `swift run -c release bench --help`.
//
// stdout carries only the final table; progress goes to stderr (unbuffered). The internal
// modes (--child, --writer, --soak-writer, --many-writer) are how the bench runs its own child
// processes: hidden from --help.

@main
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "ExactIO's strategies side by side with the naive ones, the read(2) floor and a C ceiling.",
        discussion: """
            With no options, bench runs a representative summary in one to three minutes: single \
            streams over unix at 4 KiB and 64 MiB and over tcp at 1 MiB (every strategy: the seed-* \
            ones, the read(2) floor, the C ceilings, ExactIO), 256 TCP connections at 4 KiB (the C \
            ceilings, the loop, threads), the serving cases reply and relay (with their C \
            ceilings), and positional 4 KiB reads; three runs of about 0.3 s per case (the median). \
            --all runs the \
            full matrix (every strategy, transport and size, three runs of about 1.5 s each: tens \
            of minutes); --quick a middle ground; --filter and --strategy pick cases from the full \
            matrix. --peers adds the peers to whichever set runs.

            Each case (strategy/transport/frame size) runs in a fresh child process, with the \
            writer in another process; a first short run calibrates the frame count to \
            --seconds, then --repeat runs give the median by GB/s. Ratios (x floor, x ceiling, \
            x NIO) compare strategies within the same invocation. A legend follows the tables. \
            Build with -c release: debug figures are meaningless.

            Many-connection cases (names end in /x<connections>, e.g. --filter x256 --filter 4KiB \
            --filter tcp): the reader child accepts every connection of one writer process and \
            reads all frames with one strategy, on the same descriptors for each: \
            c-uring-recv (C, one thread: an IORING_OP_RECV of up to 256 KiB per connection into \
            its own buffer, re-armed per completion, one submit-and-wait per turn), c-epoll (C, \
            one thread: epoll_wait, then one read(2) of up to 256 KiB per ready connection), \
            c-uring-mshot (C, one thread: multishot receive from a ring of provided 64 KiB \
            buffers, 2 per connection from 64 to 1024, straddling frames reassembled), loop-uring and loop-epoll (one IOLoop, \
            handlers on the global pool), loop-uring-exec and loop-epoll-exec (handlers on the \
            loop's thread), group-uring (an IOLoopGroup of 2 io_uring loops, handlers on their \
            loop), threads (a blocking ExactReader and a thread per connection). x ceiling is \
            GB/s over the best of the three C rows of the same block; CPU s/GiB is the reader's \
            user+sys time per GiB.

            Serving cases (--filter reply, --filter relay; left out of --quick unless a filter picks \
            them): reply (256 TCP connections × 4 KiB frames, each answered with an 8-byte ack; a C \
            client keeps 8 frames unacknowledged per connection): reply-c (the C ceiling: one thread, \
            epoll, the acks of a read in one write), reply-loop-uring/-epoll (handlers on the pool), \
            reply-loop-uring-exec/-epoll-exec (on the loop's thread), reply-threads, and with --peers \
            reply-swift-nio-1/-2; relay (64 TCP connections × 1 MiB frames, each frame sent on to a \
            sink connection): relay-c (the C ceiling: read-then-write, one thread), \
            relay-loop-uring/-epoll (AsyncExactReader + AsyncExactWriter.writeFrame of the frame's \
            own view on one loop thread), relay-loop-uring-zc (SEND_ZC forced), relay-threads. \
            --zero-copy measures SEND against SEND_ZC instead.
            """)

    @Flag(help: "The full matrix: every strategy, transport and frame size, many-connection and serving cases (tens of minutes); 3 runs per case, 1.5 s each. Default: the summary (1-3 minutes).")
    var all = false

    @Flag(help: "Unix and TCP at 4 KiB, 1 MiB and 64 MiB, every strategy, plus 256 TCP connections at 4 KiB (a few minutes); 1 run per case, 0.3 s.")
    var quick = false

    @Option(name: .customLong("filter"), help: ArgumentHelp(
        "Only cases whose name strategy/transport/size contains <text> (repeatable: all must match; default: every case).",
        valueName: "text"))
    var filters: [String] = []

    @Option(name: .customLong("strategy"), help: ArgumentHelp(
        "Only strategy <name> (repeatable: any of them; default: all). --list shows the cases.", valueName: "name"))
    var strategies: [String] = []

    @Option(help: ArgumentHelp("Write the results as JSON (schema in README \"Benchmarks\"; default: no file).", valueName: "file"))
    var json: String?

    @Option(help: ArgumentHelp("Write an SVG chart (GB/s and peak/frame against frame size; default: no file).", valueName: "file"))
    var svg: String?

    @Flag(help: ArgumentHelp(
        "Also run the peers (built on first use, never part of ExactIO's package graph).",
        discussion: """
            Single stream: py-asyncio (CPython asyncio readexactly) and swift-nio (SwiftNIO's \
            LengthFieldBasedFrameDecoder, one event loop). Many connections: swift-nio-1 and \
            swift-nio-2 (1 and 2 event loops; reply-swift-nio-1/-2 answer the reply case), tokio-1 and tokio-2 (tokio_util's \
            LengthDelimitedCodec on the current_thread runtime and on 2 workers; cargo, offline, \
            against Debian's librust-tokio-dev / librust-tokio-util-dev crates), py-asyncio and \
            py-uvloop (asyncio readexactly on uvloop's event loop; uvloop pip-installed into \
            Benchmarks/peers/.venv-uvloop).
            """))
    var peers = false

    @Option(name: .customLong("repeat"), help: ArgumentHelp(
        "Runs per case, in fresh processes; the median by GB/s is reported (default: 3; 1 with --quick).",
        valueName: "n"))
    var repeats: Int?

    @Option(help: ArgumentHelp(
        "How long each single-stream case runs; a first run calibrates the frame count (default: 1.5 with --all, 0.3 for the summary and --quick).",
        valueName: "s"))
    var seconds: Double?

    @Flag(help: "Print the cases (with their frame counts before calibration) and exit.")
    var list = false

    @Option(help: ArgumentHelp(
        "Soak instead of benchmarking: mixed 0 B-16 MiB frames over unix and tcp on both backends, views held at random, every frame verified, RSS sampled each second; fails if RSS keeps growing.",
        valueName: "minutes"))
    var soak: Double?

    @Option(name: .customLong("probe"), help: ArgumentHelp(
        "Run defect probe <name> of issue 16 instead of benchmarking (repeatable; 'all' runs every probe, 'list' describes them): each probe and backend in a fresh child process with a hard time limit; prints a markdown table (and --json FILE).",
        valueName: "name"))
    var probes: [String] = []

    // Internal modes: the bench's own child processes.
    @Option(parsing: .upToNextOption, help: .private) var child: [String] = []
    @Option(parsing: .upToNextOption, help: .private) var writer: [String] = []
    @Option(name: .customLong("soak-writer"), parsing: .upToNextOption, help: .private) var soakWriter: [String] = []
    @Option(name: .customLong("many-writer"), parsing: .upToNextOption, help: .private) var manyWriter: [String] = []
    @Option(help: .private) var port: UInt16?
    @Option(help: .private) var path: String?
    @Flag(help: .private) var idle = false
    @Option(name: .customLong("probe-child"), parsing: .upToNextOption, help: .private) var probeChild: [String] = []
    @Option(name: .customLong("probe-helper"), parsing: .upToNextOption, help: .private) var probeHelper: [String] = []
    @Option(name: .customLong("reply-client"), parsing: .upToNextOption, help: .private) var replyClient: [String] = []
    @Option(name: .customLong("sink"), parsing: .upToNextOption, help: .private) var sink: [String] = []

    @Flag(name: .customLong("zero-copy"), help: ArgumentHelp(
        "Measure SEND vs SEND_ZC (and SEND_ZC from registered memory) over loopback TCP at 4 KiB-16 MiB instead of benchmarking: the measurement behind AsyncExactWriter's automatic zero-copy threshold."))
    var zeroCopy = false

    func validate() throws {
        if let repeats, repeats < 1 {
            throw ValidationError("--repeat must be at least 1 (got \(repeats))")
        }
        if let seconds, !(seconds > 0 && seconds.isFinite) {
            throw ValidationError("--seconds must be a positive number of seconds (got \(seconds))")
        }
        if let soak, !(soak > 0 && soak.isFinite) {
            throw ValidationError("--soak must be a positive number of minutes (got \(soak))")
        }
        let known = Set(allStrategies + uringOnlyStrategies + peerStrategies + manyStrategies + manyPeerStrategies
            + directStrategies + forwardStrategies + randomStrategies + serveStrategies)
        for name in strategies where !known.contains(name) {
            throw ValidationError("unknown strategy '\(name)'; known: \(known.sorted().joined(separator: ", "))")
        }
        if child.isEmpty && writer.isEmpty && soakWriter.isEmpty && manyWriter.isEmpty && replyClient.isEmpty && sink.isEmpty {
            for (option, file) in [("--json", json), ("--svg", svg)] {
                if let file, file.isEmpty { throw ValidationError("\(option) needs a file name") }
            }
        }
    }

    func run() throws {
        if !writer.isEmpty { runWriterMode() }
        if !soakWriter.isEmpty { runSoakWriterMode() }
        if !manyWriter.isEmpty { runManyWriterMode() }
        if !replyClient.isEmpty { runReplyClientMode() }
        if !sink.isEmpty { runSinkMode() }
        if zeroCopy { Glibc.exit(runZeroCopyMeasurement()) }
        if !child.isEmpty { runChildMode() }
        if !probeHelper.isEmpty { runProbeHelperMode(probeHelper) }
        if !probeChild.isEmpty { runProbeChildMode(probeChild) }
        if !probes.isEmpty { Glibc.exit(runProbes(probes, jsonPath: json)) }
        if let soak {
            #if DEBUG
            log("WARNING: debug build; use swift run -c release bench --soak")
            #endif
            Glibc.exit(runSoak(minutes: soak, log: log) ? 0 : 1)
        }
        try runCases()
    }

    /// --writer TRANSPORT BYTES FRAMES [--port P | --path FILE]
    func runWriterMode() -> Never {
        guard writer.count >= 3, let n = Int(writer[1]), let frames = Int(writer[2]) else {
            internalUsage("--writer TRANSPORT BYTES FRAMES", writer)
        }
        do {
            try runWriter(transport: writer[0], n: n, frames: frames, port: port, path: path)
            Glibc.exit(0)
        } catch {
            log("writer: \(error)")
            Glibc.exit(1)
        }
    }

    /// --soak-writer TRANSPORT SEED [--port P]
    func runSoakWriterMode() -> Never {
        guard soakWriter.count >= 2, let seed = UInt64(soakWriter[1]) else {
            internalUsage("--soak-writer TRANSPORT SEED", soakWriter)
        }
        do { try runSoakWriter(transport: soakWriter[0], seed: seed, port: port) } catch {
            log("soak writer: \(error)")
            Glibc.exit(1)
        }
        Glibc.exit(0)
    }

    /// --many-writer TRANSPORT BYTES CONNECTIONS FRAMES [--idle] [--port P | --path FILE]
    func runManyWriterMode() -> Never {
        guard manyWriter.count >= 4, let n = Int(manyWriter[1]), let conns = Int(manyWriter[2]), let frames = Int(manyWriter[3]) else {
            internalUsage("--many-writer TRANSPORT BYTES CONNECTIONS FRAMES", manyWriter)
        }
        do {
            try runManyWriter(transport: manyWriter[0], n: n, connections: conns, frames: frames, idle: idle, port: port, path: path)
            Glibc.exit(0)
        } catch {
            log("many writer: \(error)")
            Glibc.exit(1)
        }
    }

    /// --reply-client TRANSPORT BYTES CONNECTIONS FRAMES [--port P]
    func runReplyClientMode() -> Never {
        guard replyClient.count >= 4, let n = Int(replyClient[1]), let conns = Int(replyClient[2]), let frames = Int(replyClient[3]) else {
            internalUsage("--reply-client TRANSPORT BYTES CONNECTIONS FRAMES", replyClient)
        }
        do {
            try runReplyClient(transport: replyClient[0], n: n, connections: conns, frames: frames, port: port, path: path)
            Glibc.exit(0)
        } catch {
            log("reply client: \(error)")
            Glibc.exit(1)
        }
    }

    /// --sink TRANSPORT CONNECTIONS BYTES [--port P]
    func runSinkMode() -> Never {
        guard sink.count >= 3, let conns = Int(sink[1]), let bytes = Int(sink[2]) else {
            internalUsage("--sink TRANSPORT CONNECTIONS BYTES", sink)
        }
        do {
            try runSink(transport: sink[0], connections: conns, expected: bytes, port: port, path: path)
            Glibc.exit(0)
        } catch {
            log("sink: \(error)")
            Glibc.exit(1)
        }
    }

    /// --child STRATEGY TRANSPORT BYTES FRAMES [CONNECTIONS [idle|busy [many|single]]]: one case;
    /// prints its JSON result.
    func runChildMode() -> Never {
        guard child.count >= 4, let n = Int(child[2]), let frames = Int(child[3]) else {
            internalUsage("--child STRATEGY TRANSPORT BYTES FRAMES [CONNECTIONS [idle|busy [many|single]]]", child)
        }
        var c = BenchCase(strategy: child[0], transport: child[1], frameBytes: n, frames: frames)
        if child.count >= 5, let conns = Int(child[4]) { c.connections = conns }
        if child.count >= 6 { c.idle = child[5] == "idle" }
        c.many = child.count >= 7 ? child[6] == "many" : c.connections > 1 || manyStrategies.contains(c.strategy)
        do {
            let r: CaseResult
            if serveStrategies.contains(c.strategy) {
                r = try runServeCase(c)
            } else if c.many || c.connections > 1 || c.idle {
                r = try runManyCase(c)
            } else if peerStrategies.contains(c.strategy) {
                r = try runPeer(c)
            } else {
                r = try runCase(c)
            }
            let data = try JSONEncoder().encode(r)
            print(String(decoding: data, as: UTF8.self))
            Glibc.exit(0)
        } catch {
            log("case \(c.name): \(error)")
            Glibc.exit(1)
        }
    }

    func internalUsage(_ shape: String, _ given: [String]) -> Never {
        log("bench: internal mode needs \(shape); got \(given.joined(separator: " "))")
        Glibc.exit(2)
    }

    func runCases() throws {
        #if DEBUG
        log("WARNING: this is a debug build; its figures are meaningless. Use: swift run -c release bench")
        #endif
        let onlyStrategies = strategies
        // The summary unless something says which cases: --all, --quick, --filter, --strategy.
        let summary = !all && !quick && filters.isEmpty && strategies.isEmpty
        let cases = summary
            ? makeSummaryCases(peers: peers)
            : (makeCases(quick: quick, peers: peers, filter: filters) + makeManyCases(quick: quick, peers: peers, filter: filters)
                + (quick && filters.isEmpty ? [] : makeServeCases(quick: quick, peers: peers, filter: filters)))
                .filter { onlyStrategies.isEmpty || onlyStrategies.contains($0.strategy) }
        if list {
            for c in cases { print("\(c.name) × \(c.frames)") }
            return
        }
        if cases.isEmpty {
            throw ValidationError("no case matches --filter \(filters) and --strategy \(strategies)")
        }
        if peers { preparePeers(for: Set(cases.map(\.strategy)), log: log) }
        let jsonPath = json, svgPath = svg
        let quick = quick
        let targetSeconds = seconds
        let repeats = repeats

        // The summary: three short runs per case (the median), inside its one to three minutes.
        let runsPerCase = repeats ?? (quick ? 1 : 3)
        let caseSeconds = targetSeconds ?? (quick || summary ? 0.3 : 1.5)
        let start = now()
        var results: [CaseResult] = []
        var failures: [String] = []
        for (k, planned) in cases.enumerated() {
            let t0 = now()
            FileHandle.standardError.write((String(format: "[%3d/%d %6.1fs] ", k + 1, cases.count, t0 - start) + pad(planned.name, 40)).data(using: .utf8)!)
            var c = planned
            var runs: [CaseResult] = []
            var lastStatus: Int32 = 0
            if !c.many && c.connections == 1 {
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

        addRatios(&results)
        print(renderTable(results))
        print(renderLegend(results, runsPerCase: runsPerCase, seconds: caseSeconds, summary: summary))
        // The table and its legend are out before anything else goes to stderr (stdout is
        // buffered when it is a pipe or a file).
        fflush(nil)  // every output stream: stdout is the one with something in it
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
        log(String(format: "%d cases in %.1fs%@%@", results.count, now() - start,
                   failures.isEmpty ? "" : "; failed: \(failures.joined(separator: ", "))" as NSString,
                   summary ? "; this was the summary: --all runs the full matrix" : ""))
        Glibc.exit(failures.isEmpty ? 0 : 1)
    }
}

func log(_ s: String) { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }

/// Runs one case in a fresh child; returns its exit status and result.
func runChild(_ c: BenchCase) -> (Int32, CaseResult?)? {
    var p: [Int32] = [0, 0]
    pipe(&p)
    let pid: pid_t
    do {
        pid = try spawn(
            selfPath,
            ["--child", c.strategy, c.transport, String(c.frameBytes), String(c.frames), String(c.connections),
             c.idle ? "idle" : "busy", c.many ? "many" : "single"],
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

