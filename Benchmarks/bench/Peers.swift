import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// Peers run as processes of their own, reading the same stream from the same writer: the
// reader child sets up the transport and hands the descriptor over as fd 3.
//   py-asyncio: Benchmarks/peers/asyncio_peer.py with the system python3
//   swift-nio:  Benchmarks/peers/nio, a separate package (NIO stays out of ExactIO's graph),
//               built in release mode on first use.

let peersDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("peers").path
let nioPackage = peersDirectory + "/nio"
let nioBinary = nioPackage + "/.build/release/NIOPeer"

func findExecutable(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
        let p = "\(dir)/\(name)"
        if access(p, X_OK) == 0 { return p }
    }
    return nil
}

/// Builds the NIO peer if needed (minutes, once). Logs and carries on if it fails: the peer's
/// cases then fail and are named in the summary.
func preparePeers(log: (String) -> Void) {
    if findExecutable("python3") == nil { log("peers: python3 not found; py-asyncio cases will fail") }
    guard let swift = findExecutable("swift") else {
        log("peers: swift not found; cannot build the NIO peer")
        return
    }
    log("peers: building the SwiftNIO peer in \(nioPackage) (release; first use takes a few minutes)")
    let pid = try? spawn(swift, ["build", "-c", "release", "--package-path", nioPackage], stdoutFD: 2)
    if let pid, waitExit(pid) == 0 { log("peers: NIO peer ready") } else { log("peers: building the NIO peer failed") }
}

func runPeer(_ c: BenchCase) throws -> CaseResult {
    let (fd, writer) = try openTransport(c)
    defer { if writer > 0 { waitExit(writer) } }
    let program: String
    var args = [c.strategy, c.transport, String(c.frameBytes), String(c.frames)]
    switch c.strategy {
    case "py-asyncio":
        guard let python = findExecutable("python3") else { throw BenchFailure("python3 not found") }
        program = python
        args = [peersDirectory + "/asyncio_peer.py"] + args
    case "swift-nio":
        program = nioBinary
    default:
        throw BenchFailure("unknown peer \(c.strategy)")
    }
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
