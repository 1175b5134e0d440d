import Foundation
#if canImport(Glibc)
import Glibc
#endif
import SystemPackage
import Testing
@testable import ExactIO

/// The DocC articles' code: present in `DocSnippets.swift` (so it compiles), and run.
@Suite struct DocSnippetTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    static func normalized(_ text: String) -> [String] {
        text.split(separator: "\n", omittingEmptySubsequences: false)
            .map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }
    }

    @Test func everyArticleBlockIsHere() throws {
        let catalogue = Self.root.appendingPathComponent("Sources/ExactIO/ExactIO.docc")
        let snippets = Self.normalized(try String(
            contentsOf: Self.root.appendingPathComponent("Tests/ExactIOTests/DocSnippets.swift"), encoding: .utf8))
        let articles = try FileManager.default.contentsOfDirectory(atPath: catalogue.path).filter { $0.hasSuffix(".md") }
        #expect(articles.count >= 6)
        var blocks = 0
        for article in articles {
            let text = try String(contentsOf: catalogue.appendingPathComponent(article), encoding: .utf8)
            for part in text.components(separatedBy: "```swift\n").dropFirst() {
                let code = Self.normalized(String(part.prefix { _ in true }.components(separatedBy: "```")[0]))
                blocks += 1
                // The block's lines appear consecutively in the snippets file.
                let found = snippets.indices.contains { i in
                    i + code.count <= snippets.count && Array(snippets[i..<(i + code.count)]) == code
                }
                #expect(found, "\(article): a swift block is not in DocSnippets.swift:\n\(code.joined(separator: "\n"))")
            }
        }
        #expect(blocks >= 8)
    }

    @Test func theReaderSnippetsDoWhatTheArticlesSay() throws {
        let bodies = [pattern(10), pattern(70_000, seed: 2), [0x41, 0x42]]
        func channel() throws -> (Channel, Writer) { try stream(.unix, bodies.flatMap(frame)) }

        var (ch, w) = try channel()
        #expect(try DocSnippets().largestFrame(ch.read) == 70_000)
        w.join(); ch.close()
        (ch, w) = try channel()
        #expect(try DocSnippets().sumFrameSizes(ch.read) == 70_012)
        w.join(); ch.close()
        (ch, w) = try channel()
        #expect(try DocSnippets().xorOfFirstBytes(ch.read) == bodies[0][0] ^ bodies[1][0] ^ 0x41)
        w.join(); ch.close()
        (ch, w) = try channel()
        let reader = try ExactReader(ch.read)
        #expect(try DocSnippets().largeFrameCopiesLittle(reader))
        #expect(try DocSnippets().largeFrameCopiesLittle(reader))
        #expect(try DocSnippets().readWithRetry(reader).map { DocSnippets().greeting($0) } == "AB")
        #expect(DocSnippets().describeBackend(reader).contains("\(reader.backend)"))
        w.join(); ch.close()

        let header = DocSnippets().keepHeader(of: ByteView(pattern(100)))
        #expect(header == ByteView(pattern(16)))

        // A length that counts its own 4 bytes.
        (ch, w) = try stream(.pipe, bodies.flatMap { encode(UInt64($0.count + 4), .uint32(.bigEndian)) + $0 })
        #expect(try DocSnippets().readSelfCountingFrames(ch.read).map(\.array) == bodies)
        w.join(); ch.close()
    }

    @Test func theFileSnippetsDoWhatTheArticleSays() throws {
        let bytes = pattern(300_000, seed: 12)
        let (fd, path) = try tempFile(containing: bytes)
        defer { try? fd.close(); unlink(path) }
        let records = try DocSnippets().records(fd, offsets: [0, 1000, 200_000], size: 100)
        #expect(records.map(\.array) == [Array(bytes[0..<100]), Array(bytes[1000..<1100]), Array(bytes[200_000..<200_100])])

        let reader = try ExactReader(fd)
        var expected: UInt64 = 0
        for byte in bytes[0..<250_000] { expected = expected &* 31 &+ UInt64(byte) }
        #expect(try DocSnippets().checksum(reader, bodyLength: 250_000) == expected)
        let (out, outPath) = try tempFile(containing: [])
        defer { try? out.close(); unlink(outPath) }
        try DocSnippets().store(reader, bodyLength: 50_000, into: out)
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: outPath))) == Array(bytes[250_000...]))
        #expect(throws: ForwardError.self) { try DocSnippets().store(reader, bodyLength: 1, into: out) }
    }

    @Test func theServerSnippetReadsEveryConnection() async throws {
        let loop = try IOLoop()
        let listener = try tcpListener()
        let sizes = Locked<[Int]>([])
        let server = Task { try await DocSnippets().serve(listener.fd, loop: loop) { frame in sizes.withLock { $0.append(frame.count) } } }
        for _ in 0..<3 {
            let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = listener.address
            let rc = withUnsafePointer(to: &addr) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            try #require(rc == 0)
            try (frame(pattern(1000)) + frame(pattern(5))).withUnsafeBytes { try writeAll(FileDescriptor(rawValue: c), $0) }
            close(c)
        }
        // Generous: under a sanitizer, with other suites blocking the cooperative pool's threads,
        // the server's tasks may wait long for a thread (20 s was once not enough under ASan).
        let deadline = ContinuousClock.now + .seconds(180)
        while sizes.withLock({ $0.count }) < 6 && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        await loop.shutdown()
        try await server.value
        try? listener.fd.close()
        #expect(sizes.withLock { $0.sorted() } == [5, 5, 5, 1000, 1000, 1000])
    }

    /// The scoped forms: a loop (or a group) for the server's scope, on a port the kernel
    /// picked; cancelling the task ends the server and shuts the loops down.
    @Test(arguments: [false, true])
    func theScopedServerSnippetsServeUntilCancelled(group: Bool) async throws {
        let sizes = Locked<[Int]>([])
        let port = Locked<UInt16?>(nil)
        let ready: @Sendable (UInt16) -> Void = { p in port.withLock { $0 = p } }
        let handle: @Sendable (ByteView) -> Void = { frame in sizes.withLock { $0.append(frame.count) } }
        let server = Task {
            if group {
                try await DocSnippets().serveOnEveryLoop(port: 0, ready: ready, handle: handle)
            } else {
                try await DocSnippets().serveOnAnyPort(ready: ready, handle: handle)
            }
        }
        let deadline = ContinuousClock.now + .seconds(180)
        while port.withLock({ $0 }) == nil && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        let p = try #require(port.withLock { $0 })
        for _ in 0..<4 {
            let c = try connectTo(loopback(p))
            try send(c, frame(pattern(300)) + frame(pattern(7)))
            try c.close()
        }
        while sizes.withLock({ $0.count }) < 8 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        server.cancel()
        try await server.value
        #expect(sizes.withLock { $0.sorted() } == [7, 7, 7, 7, 300, 300, 300, 300])
    }
}
