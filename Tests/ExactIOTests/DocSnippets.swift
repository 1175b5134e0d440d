// The code of every article in Sources/ExactIO/ExactIO.docc, compiled here so that it cannot
// rot: `DocSnippetTests.everyArticleBlockIsHere` fails when an article's swift block is not
// in this file (line by line, indentation aside), and the other tests there run the snippets.

import ExactIO
import SystemPackage

struct DocSnippets {
    // BackendsAndFallbacks.md
    func describeBackend(_ reader: ExactReader) -> String {
        guard let why = reader.fallback else { return "\(reader.backend), nothing given up" }
        if why.step == .ringSetup && why.errno == .notPermitted {
            return "io_uring is blocked here (seccomp or the io_uring_disabled sysctl): \(why)"
        }
        return "\(reader.backend): \(why)"
    }

    // ExactIO.md
    func largestFrame(_ socket: FileDescriptor) throws -> Int {
        let reader = try ExactReader(socket)
        var largest = 0
        while let frame = try reader.readFrame() {  // 4-byte big-endian length, then the body
            largest = max(largest, frame.count)     // a ByteView: no copy, safe to keep or send
        }
        return largest
    }

    // FilesAndLargeBodies.md
    func records(_ file: FileDescriptor, offsets: [Int64], size: Int) throws -> [ByteView] {
        let reader = try ExactReader(file)
        return try offsets.map { try reader.readExactly(size, at: $0) }
    }

    // FilesAndLargeBodies.md
    func checksum(_ reader: ExactReader, bodyLength: Int) throws -> UInt64 {
        var sum: UInt64 = 0
        var chunks = reader.chunks(of: bodyLength, maxChunk: 4 << 20)
        while let chunk = try chunks.next() {
            for byte in chunk { sum = sum &* 31 &+ UInt64(byte) }
        }
        return sum
    }

    // FilesAndLargeBodies.md
    func store(_ reader: ExactReader, bodyLength: Int, into file: FileDescriptor) throws {
        do {
            try reader.forward(exactly: bodyLength, to: file)
        } catch let error as ForwardError {
            print("stored \(error.forwarded) of \(error.expected) bytes: \(error.underlying)")
            throw error
        }
    }

    // FramesAndHostileInput.md
    func readSelfCountingFrames(_ fd: FileDescriptor) throws -> [ByteView] {
        var options = ExactReader.Options()
        options.lengthIncludesPrefix = true          // length = 4 + body
        options.maxFrameLength = 1 << 20             // refuse anything larger, before allocating
        let reader = try ExactReader(fd, options: options)
        var frames: [ByteView] = []
        while let frame = try reader.readFrame(prefix: .uint32(.bigEndian)) { frames.append(frame) }
        return frames
    }

    // FramesAndHostileInput.md
    func readWithRetry(_ reader: ExactReader) throws -> ByteView? {
        while true {
            do {
                return try reader.readFrame()
            } catch Errno.timedOut {
                continue  // nothing was consumed: the next call reads the same frame whole
            }
        }
    }

    // GettingStarted.md
    func sumFrameSizes(_ socket: FileDescriptor) throws -> Int {
        let reader = try ExactReader(socket)
        var total = 0
        while let frame = try reader.readFrame() {  // nil: the peer closed between frames
            total += frame.count                    // parse in place; keep or send the view
        }
        return total
    }

    // GettingStarted.md
    func xorOfFirstBytes(_ socket: FileDescriptor) throws -> UInt8 {
        let reader = try ExactReader(socket)
        var checksum: UInt8 = 0
        try reader.forEachFrame { (frame: RawSpan) in
            if frame.byteCount > 0 { checksum ^= frame.unsafeLoad(fromByteOffset: 0, as: UInt8.self) }
        }
        return checksum
    }

    // ManyConnections.md
    func serve(_ listener: FileDescriptor, loop: IOLoop, handle: @escaping @Sendable (ByteView) -> Void) async throws {
        try await withThrowingDiscardingTaskGroup { group in
            for try await connection in loop.connections(accepting: listener) {
                group.addTask {
                    defer { try? connection.close() }
                    do {
                        let reader = try AsyncExactReader(connection, loop: loop)
                        for try await frame in reader.frames() { handle(frame) }
                    } catch {
                        // A reset, a hostile length, a shutdown: this connection ends, the server goes on.
                    }
                }
            }
        }  // ends when the accept sequence does: the loop shut down, or the task was cancelled
    }

    // ManyConnections.md
    func serveOnAnyPort(ready: @Sendable (UInt16) -> Void, handle: @escaping @Sendable (ByteView) -> Void) async throws {
        try await IOLoop.withLoop { loop in
            let listener = try IOLoop.listen(host: "127.0.0.1", port: 0)  // the kernel picks the port
            defer { try? listener.close() }
            ready(try IOLoop.localPort(of: listener))
            try await serve(listener, loop: loop, handle: handle)  // until the task is cancelled
        }  // the loop is shut down here, also when the closure throws
    }

    // ManyConnections.md
    func serveOnEveryLoop(port: UInt16, ready: @Sendable (UInt16) -> Void, handle: @escaping @Sendable (ByteView) -> Void) async throws {
        try await IOLoopGroup.withLoopGroup { group in
            let listeners = try group.listen(host: "127.0.0.1", port: port)  // one per loop
            defer { for listener in listeners { try? listener.close() } }
            ready(try IOLoop.localPort(of: listeners[0]))
            try await withThrowingDiscardingTaskGroup { tasks in
                for (loop, listener) in zip(group.loops, listeners) {
                    tasks.addTask { try await serve(listener, loop: loop, handle: handle) }
                }
            }
        }
    }

    // MemoryAndCopyContract.md
    func largeFrameCopiesLittle(_ reader: ExactReader) throws -> Bool {
        let before = reader.statistics.bytesCopied
        guard let frame = try reader.readFrame() else { return true }
        return reader.statistics.bytesCopied - before <= min(frame.count, reader.options.stagingCapacity)
    }

    // MemoryAndCopyContract.md
    func keepHeader(of frame: ByteView) -> ByteView {
        ByteView(frame.prefix(16))  // 16 bytes of heap memory; the frame's page can go
    }

    // MemoryAndCopyContract.md
    func greeting(_ frame: ByteView) -> String {
        frame.utf8String
    }
}
