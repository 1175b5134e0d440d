// The README's server, compiled here so that it cannot rot (DocSnippetTests checks that the
// README's block is in this file, line by line). It runs until SIGTERM, so it is not run here;
// Examples/IngestServer, the same server grown into a program, runs end to end in CI
// (Examples/check.sh).

import ExactIO
import ExactIOServiceLifecycle
import Logging
import ServiceLifecycle

struct ServerSnippets {
    // README.md
    func ingest(port: UInt16, store: @escaping @Sendable (ByteView) async throws -> Void) async throws {
        let server = try ExactIOServer(configuration: .init(endpoint: .tcp(host: "0.0.0.0", port: port))) { connection in
            try await connection.loop.withConnection(connection.fileDescriptor) { reader, writer in
                var count: UInt64 = 0
                for try await frame in connection.frames(from: reader) {  // ends between frames at shutdown
                    try await store(frame)                                // the bytes where the kernel put them
                    count += 1
                    try await writer.write(copying: withUnsafeBytes(of: count.bigEndian) { Array($0) })
                }
            }
        }
        let logger = Logger(label: "ingest")
        try await ServiceGroup(services: [server], gracefulShutdownSignals: [.sigterm], logger: logger).run()
    }
}
