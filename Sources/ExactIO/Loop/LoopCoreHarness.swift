#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage

/// The loop reader's core (`ReaderCore<SegmentBuffer>`), driven synchronously by a script that
/// plays the loop: what arrives (received segments in the loop's shared receive buffers, split
/// where the script says), when (before or after a direct read starts), how a direct read
/// progresses, and what goes wrong (an errno kept behind the bytes before it, the end, a
/// deadline, a cancelled task, the pool running low). For the fuzz target: the same outcomes,
/// in the same order of checks, as `AsyncExactReader`'s `receive` and `direct`, in any order
/// the fuzzer picks, with receive buffers recycled as soon as nothing holds them, so a view
/// that kept a returned buffer would see it overwritten.
@_spi(Testing)
public final class LoopCoreHarness {
    /// What happens while the reader waits for buffered bytes.
    public enum Arrival {
        /// The next stream bytes arrive, in segments of these sizes.
        case segments([Int])
        /// The stream ends.
        case end
        /// The receive fails with this errno (after any bytes already queued).
        case error(Errno)
        /// The call's deadline passes / its task is cancelled.
        case timeout, cancel
        /// The receive pool runs low: the partial frame moves out of the receive buffers.
        case poolLow
    }

    /// What happens to a direct read (a large body read straight into its own memory).
    public enum DirectEvent {
        /// Bytes arrived before the read started: the reader takes them first.
        case arrivedFirst([Int])
        /// The read brings up to this many bytes.
        case progress(Int)
        case end
        case error(Errno)
        case timeout, cancel
    }

    /// Asked whenever the reader waits; the answer must eventually make progress (`segments`
    /// with a positive size, `progress`, `end`), or the call would wait forever.
    public var onWait: (_ bufferedNeeded: Int) -> Arrival
    public var onDirect: (_ capacity: Int, _ minimum: Int) -> DirectEvent

    let stream: [UInt8]
    /// Stream bytes handed to the reader (received or read directly).
    public private(set) var fed = 0
    public private(set) var ended = false
    var core: ReaderCore<SegmentBuffer>
    private let receive: ReceivePool
    private var free: [UInt16]
    /// The receive buffer being filled (incremental consumption: segments share it).
    private var current: ReceiveBuffer? = nil
    private var currentOffset = 0

    public init(
        stream: [UInt8], stagingCapacity: Int, maxFrameLength: Int,
        allowAllocation: (@Sendable (Int) -> Bool)? = nil,
        onWait: @escaping (Int) -> Arrival, onDirect: @escaping (Int, Int) -> DirectEvent
    ) throws {
        self.stream = stream
        self.onWait = onWait
        self.onDirect = onDirect
        self.receive = try ReceivePool(count: 16, size: 4096, wake: {})
        self.free = (0..<16).map { UInt16($0) }
        let pool = MemoryPool(registrar: nil, registrationLimit: nil)
        pool.allocationFilter = allowAllocation
        let capacity = try Block.roundedCapacity(stagingCapacity)
        self.core = ReaderCore(
            buffer: SegmentBuffer(nominalCapacity: capacity), pool: pool,
            maxFrameLength: maxFrameLength, directThreshold: max(1, capacity / 4))
    }

    /// Each segment is followed in its receive buffer by a byte of another connection (as when
    /// many connections share the provided buffers), so consecutive segments never continue
    /// each other.
    public var interleaveSegments = false

    public var statistics: ExactReader.Statistics { core.statistics }
    public var bufferedCount: Int { core.buffer.buffered }
    /// Segments the reader's buffer holds, and the slots of its segment array (consumed ones
    /// not yet compacted included).
    public var bufferedSegments: Int { core.buffer.queue.count }
    public var segmentSlots: Int { core.buffer.queue.segments.count }
    /// The first `n` buffered bytes (for traces).
    public func peek(_ n: Int) -> [UInt8] { (0..<min(n, core.buffer.buffered)).map { core.buffer.byte(at: $0) } }
    public var isAtEOF: Bool { core.buffer.buffered == 0 && core.sawEOF && core.pendingError == nil }

    public func readExactly(_ count: Int) throws -> ByteView { try drive { try $0.exactly(count) } }
    public func readFrame(prefix: LengthPrefix) throws -> ByteView? { try drive { try $0.frame(prefix) } }
    public func read(upTo maxCount: Int) throws -> ByteView {
        if maxCount == 0 { return ByteView() }
        return try drive { try $0.upTo(maxCount) }
    }
    public func skip(_ count: Int) throws {
        var left = count
        try drive { try $0.skip(&left) }
    }
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count > 0 else { return }
        try drive { try $0.into(buffer, slot: -1) }
    }

    // MARK: - The driver (mirrors AsyncExactReader.drive/receive/direct)

    private func drive<T>(_ step: (inout ReaderCore<SegmentBuffer>) throws -> CoreStep<T>) throws -> T {
        if let e = core.brokenError { throw e }
        while true {
            switch try step(&core) {
            case .done(let value):
                return value
            case .need(.buffered(let count)):
                try waitBuffered(count)
            case .need(.direct(let dst, let minimum, _)):
                try direct(dst, minimum: minimum)
            }
        }
    }

    private func waitBuffered(_ count: Int) throws {
        while true {
            if core.buffer.buffered >= count || core.sawEOF { return }
            if let e = core.pendingError {
                core.pendingError = nil
                throw e
            }
            if ended {
                core.sawEOF = true
                continue
            }
            switch onWait(count) {
            case .segments(let sizes): arrive(sizes)
            case .end: end()
            case .error(let e): core.pendingError = e
            case .timeout: throw Errno.timedOut
            case .cancel: throw CancellationError()
            case .poolLow: core.statistics.bytesCopied += (try? core.buffer.detachFromReceiveBuffers()) ?? 0
            }
        }
    }

    private func direct(_ dst: UnsafeMutableRawBufferPointer, minimum: Int) throws {
        if core.buffer.buffered > 0 { return }
        if let e = core.pendingError {
            core.pendingError = nil
            return try core.directCompleted(EngineResult(error: e), minimum: minimum)
        }
        if core.sawEOF || ended {
            core.sawEOF = true
            return try core.directCompleted(EngineResult(), minimum: minimum)
        }
        var got = 0
        var first = true
        while true {
            let event = onDirect(dst.count, minimum)
            defer { first = false }
            switch event {
            case .arrivedFirst(let sizes) where first:
                arrive(sizes)
                return
            case .arrivedFirst, .progress:
                var n = 0
                if case .progress(let k) = event { n = k } else { n = 1 }
                n = min(max(n, 1), dst.count - got, stream.count - fed)
                if n == 0 {  // the stream has no more bytes: its end
                    end()
                    return try core.directCompleted(EngineResult(count: got, reads: 1), minimum: minimum)
                }
                stream.withUnsafeBytes { src in
                    (dst.baseAddress! + got).copyMemory(from: src.baseAddress! + fed, byteCount: n)
                }
                fed += n
                got += n
                if got >= minimum { return try core.directCompleted(EngineResult(count: got, reads: 1), minimum: minimum) }
            case .end:
                end()
                return try core.directCompleted(EngineResult(count: got, reads: 1), minimum: minimum)
            case .error(let e):
                return try core.directCompleted(EngineResult(count: got, error: e, reads: 1), minimum: minimum)
            case .timeout:
                return try core.directInterrupted(count: got, Errno.timedOut)
            case .cancel:
                return try core.directInterrupted(count: got, CancellationError())
            }
        }
    }

    // MARK: - The loop's side

    private func end() {
        ended = true
    }

    /// The next stream bytes arrive in segments of `sizes`, written into receive buffers the
    /// way the kernel fills provided buffers incrementally.
    private func arrive(_ sizes: [Int]) {
        var segments: [Segment] = []
        for size in sizes {
            var n = min(max(size, 0), stream.count - fed)
            if n == 0 { break }
            if current == nil || receive.size - currentOffset == 0 {
                guard let buffer = takeBuffer() else {
                    // The pool is dry: memory of its own (as an evacuated queue).
                    guard let region = try? Region.standalone(capacity: n) else { break }
                    stream.withUnsafeBytes { region.base.copyMemory(from: $0.baseAddress! + fed, byteCount: n) }
                    segments.append(Segment(owner: region, base: region.base, start: 0, end: n))
                    fed += n
                    continue
                }
                current = buffer
                currentOffset = 0
            }
            let buffer = current!
            n = min(n, receive.size - currentOffset)
            stream.withUnsafeBytes { (buffer.base + currentOffset).copyMemory(from: $0.baseAddress! + fed, byteCount: n) }
            segments.append(Segment(owner: buffer, base: buffer.base, start: currentOffset, end: currentOffset + n))
            currentOffset += n
            fed += n
            if interleaveSegments { currentOffset = min(currentOffset + 1, receive.size) }
            if currentOffset == receive.size { current = nil }
        }
        if fed == stream.count { ended = true }
        core.statistics.reads += segments.count
        core.statistics.bytesCopied += core.buffer.appendAll(segments)
    }

    private func takeBuffer() -> ReceiveBuffer? {
        if free.isEmpty { free = receive.takeReturned() }
        guard let bid = free.popLast() else { return nil }
        // Scribble over a recycled buffer: a view that still referenced it would change.
        memset(receive.address(bid), 0xA5, receive.size)
        return ReceiveBuffer(pool: receive, bid: bid)
    }
}
