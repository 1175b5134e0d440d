import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// Peers run as processes of their own, reading the same stream from the same writer: the
// reader child sets up the transport and hands the descriptor over as fd 3 (many-connection
// cases: the accepted connections as fds 3, 4, …). Each prints one CaseResult JSON line.
//   py-asyncio:  Benchmarks/peers/asyncio_peer.py with the system python3
//   py-uvloop:   the same script on uvloop's event loop, with the python3 of a virtual
//                environment (Benchmarks/peers/.venv-uvloop) where uvloop is pip-installed on
//                first use
//   swift-nio, swift-nio-1, swift-nio-2: Benchmarks/peers/nio, a separate package (NIO stays
//                out of ExactIO's graph), built in release mode on first use; 1 or 2 event loops
//   reply-swift-nio-1, reply-swift-nio-2: the same peer answering every frame with an 8-byte
//                ack (the serving case `reply`, bench/Serve.swift)
//   tokio-1, tokio-2: Benchmarks/peers/tokio, a Rust crate built on first use with cargo,
//                offline, against Debian's vendored crates (librust-tokio-dev,
//                librust-tokio-util-dev; see its .cargo/config.toml)

let peersDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("peers").path
let nioPackage = peersDirectory + "/nio"
let nioBinary = nioPackage + "/.build/release/NIOPeer"
let tokioCrate = peersDirectory + "/tokio"
let tokioBinary = tokioCrate + "/target/release/tokio-peer"
let uvloopVenv = peersDirectory + "/.venv-uvloop"

func findExecutable(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
        let p = "\(dir)/\(name)"
        if access(p, X_OK) == 0 { return p }
    }
    return nil
}

/// Runs `script` with /bin/sh, its output on stderr; true when it exits 0.
private func shell(_ script: String) -> Bool {
    guard let pid = try? spawn("/bin/sh", ["-c", script], stdoutFD: 2) else { return false }
    return waitExit(pid) == 0
}

private func quoted(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }

/// Builds the peers the selected cases need, if needed (the NIO peer takes minutes, once). Logs
/// and carries on if a build fails: that peer's cases then fail and are named in the summary.
func preparePeers(for strategies: Set<String>, log: (String) -> Void) {
    let python = findExecutable("python3")
    if strategies.contains(where: { $0.hasPrefix("py-") }) && python == nil {
        log("peers: python3 not found; py-asyncio and py-uvloop cases will fail")
    }
    if strategies.contains(where: { $0.hasPrefix("swift-nio") || $0.hasPrefix("reply-swift-nio") }) {
        if let swift = findExecutable("swift") {
            log("peers: building the SwiftNIO peer in \(nioPackage) (release; first use takes a few minutes)")
            let pid = try? spawn(swift, ["build", "-c", "release", "--package-path", nioPackage], stdoutFD: 2)
            if let pid, waitExit(pid) == 0 { log("peers: NIO peer ready") } else { log("peers: building the NIO peer failed") }
        } else {
            log("peers: swift not found; cannot build the NIO peer")
        }
    }
    if strategies.contains(where: { $0.hasPrefix("tokio-") }) {
        if let cargo = findExecutable("cargo") {
            log("peers: building the tokio peer in \(tokioCrate) (cargo, release, offline against /usr/share/cargo/registry)")
            if shell("cd \(quoted(tokioCrate)) && \(quoted(cargo)) build --release --offline") {
                log("peers: tokio peer ready")
            } else {
                log("peers: building the tokio peer failed (Debian's crates: apt-get install librust-tokio-dev librust-tokio-util-dev librust-futures-dev)")
            }
        } else {
            log("peers: cargo not found; cannot build the tokio peer")
        }
    }
    if strategies.contains("py-uvloop"), let python {
        let venvPython = quoted(uvloopVenv + "/bin/python3")
        if shell("\(venvPython) -c 'import uvloop' 2>/dev/null") {
            log("peers: uvloop ready in \(uvloopVenv)")
        } else {
            log("peers: installing uvloop into \(uvloopVenv) (python3 -m venv, pip install uvloop)")
            if shell("\(quoted(python)) -m venv \(quoted(uvloopVenv)) && \(venvPython) -m pip install --quiet uvloop 1>&2") {
                log("peers: uvloop ready")
            } else {
                log("peers: installing uvloop failed; py-uvloop cases will fail")
            }
        }
    }
}

/// The program (and its leading arguments) of peer `strategy`.
func peerProgram(_ strategy: String) throws -> (String, [String]) {
    switch strategy {
    case "py-asyncio":
        guard let python = findExecutable("python3") else { throw BenchFailure("python3 not found") }
        return (python, [peersDirectory + "/asyncio_peer.py"])
    case "py-uvloop":
        let python = uvloopVenv + "/bin/python3"
        guard access(python, X_OK) == 0 else { throw BenchFailure("no \(python): uvloop is not installed (see the log above)") }
        return (python, [peersDirectory + "/asyncio_peer.py"])
    case "swift-nio", "swift-nio-1", "swift-nio-2", "reply-swift-nio-1", "reply-swift-nio-2":
        guard access(nioBinary, X_OK) == 0 else { throw BenchFailure("no \(nioBinary): the NIO peer is not built (see the log above)") }
        return (nioBinary, [])
    case "tokio-1", "tokio-2":
        guard access(tokioBinary, X_OK) == 0 else { throw BenchFailure("no \(tokioBinary): the tokio peer is not built (see the log above)") }
        return (tokioBinary, [])
    default:
        throw BenchFailure("unknown peer \(strategy)")
    }
}

func runPeer(_ c: BenchCase) throws -> CaseResult {
    let (program, prefix) = try peerProgram(c.strategy)
    let (fd, writer) = try openTransport(c)
    defer { if writer > 0 { waitExit(writer) } }
    let args = prefix + [c.strategy, c.transport, String(c.frameBytes), String(c.frames)]
    var p: [Int32] = [0, 0]
    guard pipe(&p) == 0 else {
        close(fd)
        throw BenchFailure("pipe: errno \(errno)")
    }
    let spawned = Result { try spawn(program, args, passFD: fd, stdoutFD: p[1]) }
    close(p[1])
    close(fd)  // the peer holds its own copy
    let pid = try spawned.get()
    let out = readToEnd(closing: p[0])
    let status = waitExit(pid)
    guard status == 0 else { throw BenchFailure("\(c.strategy) exited with \(status)") }
    return try JSONDecoder().decode(CaseResult.self, from: Data(out))
}
