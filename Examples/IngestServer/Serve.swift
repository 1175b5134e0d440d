import ExactIO
import ExactIOServiceLifecycle
import Logging
import ServiceLifecycle
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// The server: ExactIOServer runs `handle` for every connection on its loops; the frames go to
// an append-only file; ServiceGroup turns SIGTERM/SIGINT into a graceful shutdown.

func serve(_ arguments: Arguments) async throws {
    let host = arguments.string("host", "127.0.0.1")
    let port = try arguments.int("port", 0)
    guard port <= Int(UInt16.max) else { throw UsageError("--port \(port) is not a port") }
    let sink = try FrameFile(path: arguments.string("out", "ingest.bin"))
    let readerOptions = try ExactReader.Options(maxFrameLength: arguments.int("max-frame", 16 << 20))
    var logger = Logger(label: "exactio-ingest")
    logger.logLevel = .info
    let log = logger

    let server = try ExactIOServer(
        configuration: .init(
            endpoint: .tcp(host: host, port: UInt16(port)),
            loopCount: max(1, try arguments.int("loops", IOLoopGroup.onlineCores)),
            gracePeriod: .seconds(try arguments.int("grace", 10))
        )
    ) { connection in
        do {
            try await handle(connection, sink: sink, readerOptions: readerOptions)
        } catch {
            // One peer's failure ends its connection only; the server goes on.
            log.info("connection closed: \(error)")
            throw error
        }
    }
    say("listening on \(host):\(server.port ?? 0)")

    let group = ServiceGroup(
        services: [server], gracefulShutdownSignals: [.sigterm, .sigint], cancellationSignals: [],
        logger: logger)
    try await group.run()

    try sink.close()
    let stored = sink.stored
    say("stopped: \(stored.frames) frames, \(stored.bytes) body bytes stored")
}

/// One connection: each frame into the file, then its ack. The sequence of frames ends at a
/// frame boundary when the server shuts down, so every frame that was acknowledged is in the
/// file and no frame is cut in two.
func handle(_ connection: ExactIOServer.Connection, sink: FrameFile, readerOptions: ExactReader.Options) async throws {
    try await connection.loop.withConnection(connection.fileDescriptor, readerOptions: readerOptions) { reader, writer in
        var count: UInt64 = 0
        for try await frame in connection.frames(from: reader) {
            try sink.append(frame)
            count += 1
            try await writer.write(copying: withUnsafeBytes(of: count.bigEndian) { Array($0) })
        }
    }
}

/// An append-only file of length-prefixed frames (4-byte big-endian lengths, as they arrived),
/// written by every connection at once: each frame reserves its place with an atomic add, then
/// one `pwritev` writes its prefix and its body from where the kernel received them.
final class FrameFile: Sendable {
    private let fd: FileDescriptor
    private let end = Atomic<Int64>(0)
    private let frameCount = Atomic<Int>(0)
    private let bodyBytes = Atomic<Int>(0)

    init(path: String) throws {
        fd = try FileDescriptor.open(
            path, .writeOnly, options: [.create, .truncate, .closeOnExec], permissions: [.ownerReadWrite, .groupRead, .otherRead])
    }

    var stored: (frames: Int, bytes: Int) { (frameCount.load(ordering: .relaxed), bodyBytes.load(ordering: .relaxed)) }

    func append(_ frame: ByteView) throws {
        var prefix = UInt32(frame.count).bigEndian
        let total = 4 + frame.count
        let offset = end.wrappingAdd(Int64(total), ordering: .relaxed).oldValue
        try withUnsafeMutableBytes(of: &prefix) { prefixBytes in
            try frame.withUnsafeBytes { body in
                var written = 0
                while written < total {
                    // What is left of [prefix, body] after `written` bytes.
                    var parts: [iovec] = []
                    if written < 4 {
                        parts.append(iovec(iov_base: prefixBytes.baseAddress! + written, iov_len: 4 - written))
                    }
                    let bodyDone = max(0, written - 4)
                    if bodyDone < body.count {
                        parts.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress! + bodyDone), iov_len: body.count - bodyDone))
                    }
                    let n = pwritev(fd.rawValue, parts, Int32(parts.count), off_t(offset) + off_t(written))
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw Errno(rawValue: errno)
                    }
                    written += n
                }
            }
        }
        frameCount.wrappingAdd(1, ordering: .relaxed)
        bodyBytes.wrappingAdd(frame.count, ordering: .relaxed)
    }

    /// Syncs the file to disk and closes it.
    func close() throws {
        _ = fsync(fd.rawValue)
        try fd.close()
    }
}
