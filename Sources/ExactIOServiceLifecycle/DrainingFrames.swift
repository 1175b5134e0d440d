import ExactIO

// The frames of a connection until the server shuts down, ending at a frame boundary: a frame
// that has begun to arrive is read whole; a connection that waits for its next frame ends.

/// The frames of a reader that end at a frame boundary once the server shuts down
/// (`ExactIOServer.Connection.frames(from:prefix:)`).
public struct DrainingFrames: AsyncSequence {
    /// Each frame's body, as a read-only view.
    public typealias Element = ByteView
    let reader: AsyncExactReader
    let prefix: LengthPrefix
    let stop: StopSignal

    /// The iterator that reads the next frame each time it is asked.
    public func makeAsyncIterator() -> Iterator {
        Iterator(reader: reader, prefix: prefix, stop: stop)
    }

    /// Reads frames one by one, and ends between two once the server shuts down.
    public struct Iterator: AsyncIteratorProtocol {
        let reader: AsyncExactReader
        let prefix: LengthPrefix
        let stop: StopSignal

        /// The next frame; nil at a clean end of stream, or, once the server shuts down, when
        /// no byte of a next frame has arrived. Throws as `AsyncExactReader.readFrame(prefix:)`.
        public mutating func next() async throws -> ByteView? {
            while true {
                // Bytes of the next frame are here (or all of it): it is read whole, shutdown
                // or not (only the end of the grace period, a cancellation, cuts it short).
                if reader.bufferedCount > 0 { return try await reader.readFrame(prefix: prefix) }
                if stop.isStopping { return nil }
                // Nothing yet: wait for the next frame, unless the server stops first. The
                // read is then cancelled, which consumes nothing; bytes that came meanwhile make
                // the frame one that has begun (read whole on the next turn).
                switch try await readFrameUnlessStopped() {
                case .frame(let frame): return frame
                case .stopped: continue
                }
            }
        }

        private enum Outcome: Sendable {
            case frame(ByteView?)
            case stopped
        }

        private func readFrameUnlessStopped() async throws -> Outcome {
            let lent = LentReader(reader)
            let prefix = prefix
            let stop = stop
            return try await withThrowingTaskGroup(of: Outcome.self) { group in
                group.addTask { .frame(try await lent.reader.readFrame(prefix: prefix)) }
                group.addTask {
                    await stop.wait()
                    return .stopped
                }
                let first = try await group.next()!
                group.cancelAll()
                if case .frame = first { return first }
                // Stopped (or this task was cancelled): the read ends with CancellationError,
                // or with what it got before it saw the cancellation.
                do {
                    return try await group.next()!
                } catch is CancellationError where !Task.isCancelled {
                    return .stopped
                }
            }
        }
    }
}

/// A reader lent to the child task of `readFrameUnlessStopped`.
private final class LentReader: @unchecked Sendable {
    // @unchecked Sendable: the reader has one user at a time: the iterator waits for the
    // child task that reads before it touches the reader again.
    let reader: AsyncExactReader
    init(_ reader: AsyncExactReader) { self.reader = reader }
}
