import Foundation
import Glibc
import SystemPackage
import Testing
@testable import ExactIO

@Suite struct LoopTests {
    @Test(arguments: testBackends)
    func framesOverOneConnection(backend: ExactReader.Backend) async throws {
        let loop = try IOLoop(options: .init(backend: backend))
        #expect(loop.backend == backend)
        let sizes = [0, 1, 100, 4096, 20_000, 70_000, 300_000, 3 << 20, 5]
        let bodies = sizes.enumerated().map { pattern($1, seed: UInt64($0 + 1)) }
        let (ch, writer) = try stream(.unix, bodies.flatMap(frame), chunks: [7, 65536, 1000, 1 << 20])
        defer { ch.close() }
        let reader = try AsyncExactReader(ch.read, loop: loop, options: .init(stagingCapacity: 64 << 10))
        var got: [ByteView] = []
        while let f = try await reader.readFrame() { got.append(f) }
        writer.join()
        #expect(got.count == bodies.count)
        for (v, b) in zip(got, bodies) { #expect(v == ByteView(b)) }
        await loop.shutdown()
    }
}
