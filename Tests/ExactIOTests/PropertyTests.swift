import PropertyBased
import SystemPackage
import Testing
@testable import ExactIO

/// Reads frame `body` with the API call chosen by `op`, checking it, so random sequences mix
/// every call against the same stream.
func readOne(_ reader: ExactReader, _ body: [UInt8], op: Int) throws {
    switch op % 5 {
    case 0:
        #expect(try reader.readFrame() == ByteView(body))
    case 1:
        let header = try reader.readExactly(4)
        #expect(Array(header) == Array(frame(body).prefix(4)))
        #expect(try reader.readExactly(body.count) == ByteView(body))
    case 2:
        try reader.skip(4)
        #expect(ByteView(try reader.withExactly(body.count) { Array($0) }) == ByteView(body))
    case 3:
        try reader.skip(4)
        var buf = [UInt8](repeating: 0xEE, count: body.count)
        try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
        #expect(ByteView(buf) == ByteView(body))
    default:
        try reader.skip(4)
        var got: [UInt8] = []
        while got.count < body.count {
            let part = try reader.read(upTo: body.count - got.count)
            #expect(!part.isEmpty)
            got += part
        }
        #expect(ByteView(got) == ByteView(body))
    }
}

@Suite struct PropertyTests {
    /// Random frame sequences, random chunkings, random API calls, scripted reads (no fds):
    /// every byte arrives once, in order.
    @Test func randomChunkingsScripted() async {
        await propertyCheck(
            count: 200,
            input: Gen.int(in: 0...40_000).array(of: 0...12),
            Gen.int(in: 1...9000).array(of: 1...6),
            Gen.int(in: 0...4).array(of: 12...12),
            Gen.element(of: [4096, 16384, 65536])
        ) { sizes, chunks, ops, staging in
            let bodies = sizes.enumerated().map { pattern($1, seed: UInt64($0 + 7)) }
            let wire = bodies.flatMap(frame)
            var steps: [Step] = []
            var total = 0
            var i = 0
            while total < wire.count {
                steps.append(.bytes(chunks[i % chunks.count]))
                total += chunks[i % chunks.count]
                i += 1
            }
            let reader = try! scriptedReader(Script(data: wire, steps: steps), staging: staging!)
            for (k, b) in bodies.enumerated() { try readOne(reader, b, op: ops[k % ops.count]) }
            #expect(try reader.readFrame() == nil)
        }
    }

    /// The same over real pipes and sockets on every backend, including 1-byte writes.
    @Test(arguments: testBackends)
    func randomChunkingsRealDescriptors(backend: ExactReader.Backend) async {
        await propertyCheck(
            count: 25,
            input: Gen.int(in: 0...100_000).array(of: 0...8),
            Gen.element(of: [[1], [1, 4096], [65536], [3, 70_000, 11]]),
            Gen.int(in: 0...4).array(of: 8...8),
            Gen.element(of: [Transport.pipe, .unix, .tcp])
        ) { sizes, chunks, ops, transport in
            let bodies = sizes.enumerated().map { pattern($1, seed: UInt64($0 + 3)) }
            // 1-byte writes only for small totals, to keep the suite quick.
            let chunking = bodies.reduce(0) { $0 + $1.count } > 50_000 && chunks! == [1] ? [4096] : chunks!
            let (ch, writer) = try! stream(transport!, bodies.flatMap(frame), chunks: chunking)
            defer { ch.close() }
            let reader = try! ExactReader(ch.read, options: options(backend, staging: 16384))
            for (k, b) in bodies.enumerated() { try readOne(reader, b, op: ops[k]) }
            #expect(try reader.readFrame() == nil)
            writer.join()
        }
    }
}
