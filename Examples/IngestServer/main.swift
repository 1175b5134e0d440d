// exactio-ingest: a real ingest server on ExactIO, and the client that drives and checks it.
//
//   swift run exactio-ingest serve --port 9000 --out ingest.bin
//   swift run exactio-ingest client --port 9000 --connections 8 --frames 1000 --bad-peers
//   swift run exactio-ingest verify ingest.bin --connections 8 --frames 1000
//
// The server accepts on an IOLoopGroup (ExactIOServer, one loop per core), reads length-
// prefixed frames, appends each one to the output file straight from the memory the kernel
// received it into (pwritev of the prefix and the body: no copy in user space), and answers
// each frame with an 8-byte ack (the connection's frame count, big-endian) once the frame is in
// the file. A bad peer (an oversized length, a reset mid-frame, garbage) ends its own
// connection, never the server. SIGTERM or SIGINT shuts it down gracefully: it stops accepting,
// lets connections finish the frame in hand, syncs the file and exits 0.

import ExactIO
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

let usage = """
    usage: exactio-ingest serve  [--host 127.0.0.1] [--port 0] [--out ingest.bin] [--loops <cores>]
                                 [--max-frame 16777216] [--grace 10]
           exactio-ingest client [--host 127.0.0.1] --port P [--connections 8] [--frames 1000]
                                 [--max-size 65536] [--window 16] [--bad-peers] [--record ACKS]
           exactio-ingest verify FILE [--connections 8] [--frames 1000] [--max-size 65536] [--acked ACKS]

    serve   prints "listening on HOST:PORT" (port 0: the kernel picks one), serves until SIGTERM
            or SIGINT, then prints the frames and bytes it stored and exits 0.
    client  sends --frames frames per connection (sizes 16 B to --max-size, a deterministic
            pattern), at most --window unacknowledged, and checks every ack; --bad-peers also
            opens connections that send an oversized length, reset mid-frame and send garbage;
            --record writes how many frames each connection saw acknowledged (also on failure).
    verify  reads FILE with ExactReader and checks that it holds every frame the client sent,
            each exactly once and intact; with --acked (a client's --record, from a run the
            server's shutdown cut short), every acknowledged frame, each once and intact.
    """

let arguments = Arguments(Array(CommandLine.arguments.dropFirst()))
do {
    switch arguments.command {
    case "serve": try await serve(arguments)
    case "client": try await runClient(arguments)
    case "verify": try verify(arguments)
    default:
        say(usage)
        exit(arguments.command == "--help" || arguments.command == "-h" ? 0 : 2)
    }
} catch {
    _ = try? FileDescriptor.standardError.writeAll("exactio-ingest: \(error)\n".utf8)
    exit(1)
}


/// The command line: a command and `--name value` options.
struct Arguments {
    var command: String
    var positional: [String] = []
    var options: [String: String] = [:]
    var flags: Set<String> = []

    init(_ words: [String]) {
        command = words.first ?? ""
        var i = 1
        while i < words.count {
            let word = words[i]
            if word.hasPrefix("--") {
                let name = String(word.dropFirst(2))
                if name == "bad-peers" || i + 1 == words.count {
                    flags.insert(name)
                } else {
                    options[name] = words[i + 1]
                    i += 1
                }
            } else {
                positional.append(word)
            }
            i += 1
        }
    }

    func string(_ name: String, _ fallback: String) -> String { options[name] ?? fallback }

    func int(_ name: String, _ fallback: Int) throws -> Int {
        guard let text = options[name] else { return fallback }
        guard let value = Int(text), value >= 0 else { throw UsageError("--\(name) wants a count, got \(text)") }
        return value
    }
}

struct UsageError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Prints a line at once (unbuffered: the check script reads the server's lines as they come).
func say(_ line: String) {
    _ = try? FileDescriptor.standardOutput.writeAll((line + "\n").utf8)
}
