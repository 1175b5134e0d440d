// libFuzzer target for the reader core (issue: hostile input and faults).
//
// The input is split in two: a control program (what each read(2) returns: a chunk size,
// EINTR, EAGAIN, ECONNRESET, ETIMEDOUT or EOF; which allocations of frame and staging memory
// fail with ENOMEM; and which API call to make next) and the stream bytes.
// The reader runs over a scripted source (`@_spi(Testing) init(testingRead:)`) that feeds the
// stream bytes in the chunks the program chose. Checked after every call:
//   - every delivered byte equals the stream byte at the same position: none lost, duplicated
//     or reordered (a cursor follows what each call consumed);
//   - an Errno (including ENOMEM from a refused mapping) leaves the reader consistent
//     (readExactly/readFrame consume nothing; skip says how far it got in
//     statistics.bytesSkipped);
//   - views handed out earlier never change (kept ones are re-checked after every call).
//
// Half of the inputs (a control bit) drive the loop instead (`LoopHarness`: a real IOLoop
// without a thread, its real LoopMachine and a real AsyncExactReader, with a scripted backend
// in place of the kernel): the program then picks what the kernel does next and in which
// order — received segments of any size split across recycled receive buffers, partial large
// reads, an errno kept behind the bytes before it, deadlines, cancelled
// tasks, the pool running low, trickles of one-byte segments (interleaved with other
// connections' bytes in the receive buffers, so that they are coalesced) — and the same
// invariants are checked.
//
// Built two ways:
//   - normally (`swift build`): a replay tool, `fuzz-exactio FILE|DIR...`, runs inputs once;
//   - with `-sanitize=fuzzer,address -DFUZZING` (Fuzz/run.sh): the libFuzzer entry point.
@_spi(Testing) import ExactIO
import SystemPackage
import Synchronization

/// Reads bytes of the control program; 0 once it runs out.
struct Program {
    let bytes: [UInt8]
    var i = 0
    mutating func next() -> UInt8 {
        defer { i += 1 }
        return i < bytes.count ? bytes[i] : 0
    }
    mutating func int(_ range: ClosedRange<Int>) -> Int {
        let v = Int(next()) | Int(next()) << 8
        return range.lowerBound + v % (range.count)
    }
    var done: Bool { i >= bytes.count }
}

/// The scripted descriptor: feeds `stream` in chunks the program picks, injecting errors.
final class Source: Sendable {
    struct State {
        var program: Program
        var fed = 0  // stream bytes handed to the reader
        var ended = false  // EOF injected or stream exhausted
        var resets = 0
        var stalls = 0
    }
    let stream: [UInt8]
    let state: Mutex<State>

    init(stream: [UInt8], program: Program) {
        self.stream = stream
        self.state = Mutex(State(program: program))
    }

    func read(_ buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Errno> {
        state.withLock { s in
            if s.ended || s.fed == stream.count {
                s.ended = true
                return .success(0)
            }
            // Once the program runs out, or after three injected errors in a row, deliver:
            // the stream must make progress (EINTR/EAGAIN are retried forever, as they should).
            if s.program.done || s.stalls >= 3 {
                s.stalls = 0
                let n = min(buffer.count, stream.count - s.fed, 65536)
                for k in 0..<n { buffer[k] = stream[s.fed + k] }
                s.fed += n
                return .success(n)
            }
            let c = s.program.next()
            if c % 16 < 3 { s.stalls += 1 } else { s.stalls = 0 }
            switch c % 16 {
            case 0: return .failure(.interrupted)
            case 1: return .failure(.resourceTemporarilyUnavailable)
            case 2 where s.resets < 3:
                s.resets += 1
                return .failure(s.resets % 2 == 0 ? .timedOut : .connectionReset)
            case 3 where s.program.next() < 16:
                s.ended = true  // an early end of stream: the rest is never delivered
                return .success(0)
            default:
                let want = 1 + Int(s.program.next()) * (c % 4 == 0 ? 257 : 1)
                let n = min(want, buffer.count, stream.count - s.fed)
                for k in 0..<n { buffer[k] = stream[s.fed + k] }
                s.fed += n
                return .success(n)
            }
        }
    }

    var available: Int { state.withLock { $0.fed } }
    var ended: Bool { state.withLock { $0.ended } }
}

struct InvariantFailure: Error, CustomStringConvertible {
    let description: String
}

func check(_ ok: Bool, _ what: @autoclosure () -> String) throws {
    if !ok { throw InvariantFailure(description: what()) }
}

/// What the invariant checks need from either reader.
protocol FuzzedReader: AnyObject {
    func readExactly(_ count: Int) throws -> ByteView
    func readFrame(prefix: LengthPrefix) throws -> ByteView?
    /// `withNextFrame`, the lent bytes copied out.
    func lendFrame(prefix: LengthPrefix) throws -> [UInt8]?
    func read(upTo maxCount: Int) throws -> ByteView
    func skip(_ count: Int) throws
    func bytes(_ count: Int) throws -> [UInt8]
    func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws
    var isAtEOF: Bool { get }
    var bufferedCount: Int { get }
    var bytesSkipped: Int { get }
    /// Stream bytes handed to the reader so far, and whether the stream has ended.
    var fed: Int { get }
    var ended: Bool { get }
}

/// The blocking reader over the scripted descriptor.
final class BlockingUnderTest: FuzzedReader {
    let reader: ExactReader
    let source: Source
    init(_ reader: ExactReader, _ source: Source) {
        self.reader = reader
        self.source = source
    }
    func readExactly(_ count: Int) throws -> ByteView { try reader.readExactly(count) }
    func readFrame(prefix: LengthPrefix) throws -> ByteView? { try reader.readFrame(prefix: prefix) }
    func lendFrame(prefix: LengthPrefix) throws -> [UInt8]? {
        try reader.withNextFrame(prefix: prefix) { span in span.withUnsafeBytes { Array($0) } }
    }
    func read(upTo maxCount: Int) throws -> ByteView { try reader.read(upTo: maxCount) }
    func skip(_ count: Int) throws { try reader.skip(count) }
    func bytes(_ count: Int) throws -> [UInt8] { try reader.withExactly(count) { Array($0) } }
    func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws { try reader.readExactly(into: buffer) }
    var isAtEOF: Bool { reader.isAtEOF }
    var bufferedCount: Int { reader.bufferedCount }
    var bytesSkipped: Int { reader.statistics.bytesSkipped }
    var fed: Int { source.available }
    var ended: Bool { source.ended }
}

/// The loop reader's core, with the program playing the loop.
final class LoopCoreUnderTest: FuzzedReader {
    let harness: LoopHarness
    init(_ harness: LoopHarness) { self.harness = harness }
    func readExactly(_ count: Int) throws -> ByteView { try harness.readExactly(count) }
    func readFrame(prefix: LengthPrefix) throws -> ByteView? { try harness.readFrame(prefix: prefix) }
    func lendFrame(prefix: LengthPrefix) throws -> [UInt8]? { try harness.withNextFrame(prefix: prefix) }
    func read(upTo maxCount: Int) throws -> ByteView { try harness.read(upTo: maxCount) }
    func skip(_ count: Int) throws { try harness.skip(count) }
    func bytes(_ count: Int) throws -> [UInt8] { Array(try harness.readExactly(count)) }
    func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws { try harness.readExactly(into: buffer) }
    var isAtEOF: Bool { harness.isAtEOF }
    var bufferedCount: Int { harness.bufferedCount }
    var bytesSkipped: Int { harness.statistics.bytesSkipped }
    var fed: Int { harness.fed }
    var ended: Bool { harness.ended }
}

/// The loop's side of the program: what arrives and what goes wrong, in the order it picks.
final class LoopScript {
    var program: Program
    var resets = 0
    var stalls = 0
    init(_ program: Program) { self.program = program }

    /// Past the program, or after a few events without progress, bytes flow.
    private var mustProgress: Bool {
        if program.done || stalls >= 3 {
            stalls = 0
            return true
        }
        return false
    }
    private func sizes(_ c: UInt8) -> [Int] {
        (0..<(1 + Int(c % 3))).map { _ in 1 + Int(program.next()) * (c % 4 == 0 ? 257 : 1) }
    }
    private func error() -> Errno {
        resets += 1
        return resets % 2 == 0 ? .timedOut : .connectionReset
    }

    func onWait(_ needed: Int) -> LoopHarness.Arrival {
        if mustProgress { return .segments([65536]) }
        let c = program.next()
        stalls += 1
        switch c % 16 {
        case 0: return .timeout
        case 1: return .cancel
        case 2 where resets < 3: return .error(error())
        case 3 where program.next() < 16: return .end
        case 4: return .poolLow
        case 5, 6:
            // A trickle: up to 256 one-byte segments (a peer sending a byte at a time).
            stalls = 0
            return .segments(Array(repeating: 1, count: 1 + Int(program.next())))
        default:
            stalls = 0
            return .segments(sizes(c))
        }
    }

    func onLargeRead(_ capacity: Int, _ minimum: Int) -> LoopHarness.LargeReadEvent {
        if mustProgress { return .progress(capacity) }
        let c = program.next()
        stalls += 1
        switch c % 16 {
        case 0: return .timeout
        case 1: return .cancel
        case 2 where resets < 3: return .error(error())
        case 3 where program.next() < 16: return .end
        default:
            stalls = 0
            return .progress(1 + Int(program.next()) * 257)
        }
    }
}

/// Runs one input; throws InvariantFailure when an invariant breaks.
func runOne(_ data: [UInt8], trace: ((String) -> Void)? = nil) throws {
    guard data.count >= 2 else { return }
    let split = min(Int(data[0]) * 4 + 1, data.count)
    var control = Program(bytes: Array(data[1..<split]))
    let stream = Array(data[split...])
    let staging = 4096 << Int(control.next() % 3)
    let limit = control.int(0...70_000)
    // Every k-th new mapping (staging refills, frame memory) fails with ENOMEM; 0: none.
    let failEvery = Int(control.next() % 6)
    let loopCore = control.next() & 1 == 1
    let allocations = Mutex(0)
    let allow: @Sendable (Int) -> Bool = { _ in
        allocations.withLock { n in
            n += 1
            return failEvery == 0 || n % failEvery != 0
        }
    }
    let reader: any FuzzedReader
    if loopCore {
        let script = LoopScript(control)
        let harness = try LoopHarness(
            stream: stream, stagingCapacity: staging, maxFrameLength: limit, allowAllocation: allow,
            onWait: { script.onWait($0) }, onLargeRead: { script.onLargeRead($0, $1) })
        // Segments from many connections share receive buffers: none continues the last.
        harness.interleaveSegments = control.next() & 1 == 1
        reader = LoopCoreUnderTest(harness)
    } else {
        let source = Source(stream: stream, program: control)
        reader = BlockingUnderTest(try ExactReader(
            options: .init(backend: .posix, stagingCapacity: staging, maxFrameLength: limit),
            testingRead: { source.read($0) }, allowAllocation: allow), source)
    }
    let source = reader  // where the checks ask what was fed
    var ops = Program(bytes: Array(data[1..<split].reversed()))
    var pos = 0  // bytes of `stream` consumed so far
    var kept: [(ByteView, Int)] = []  // views kept alive, with where they came from

    func expectAt(_ view: some Collection<UInt8>, _ at: Int) throws {
        try check(at + view.count <= stream.count, "view past the end of the stream")
        try check(view.elementsEqual(stream[at..<(at + view.count)]), "bytes differ at \(at)")
    }
    /// What the stream says a prefix of `kind` is at `pos`: (length, width), if complete.
    func decodePrefix(_ prefix: LengthPrefix, at p: Int) -> (UInt64, Int)? {
        // Only bytes the source has fed can be part of a prefix the reader saw.
        let rest = stream[p..<max(p, source.fed)]
        switch prefix {
        case .varint:
            var v: UInt64 = 0
            for (i, b) in rest.prefix(10).enumerated() {
                if i == 9 && b > 1 {
                    // Refused whole: through its last byte (the first without the continuation
                    // bit), or to the end of the stream.
                    let end = rest.dropFirst(9).firstIndex { $0 & 0x80 == 0 }.map { $0 + 1 } ?? rest.endIndex
                    return (.max, end - p)
                }
                v |= UInt64(b & 0x7f) << UInt64(7 * i)
                if b & 0x80 == 0 { return (v, i + 1) }
            }
            return nil
        default:
            let w: Int
            let e: LengthPrefix.Endianness
            switch prefix {
            case .uint8: (w, e) = (1, .bigEndian)
            case .uint16(let x): (w, e) = (2, x)
            case .uint32(let x): (w, e) = (4, x)
            case .uint64(let x): (w, e) = (8, x)
            case .varint: return nil
            }
            guard rest.count >= w else { return nil }
            let bytes = Array(rest.prefix(w))
            let ordered = e == .bigEndian ? bytes : bytes.reversed()
            return (ordered.reduce(0) { $0 << 8 | UInt64($1) }, w)
        }
    }

    /// The reader is inside a refused over-long varint (an error stopped its skip): the next
    /// varint frame read finishes the skip; any other read ends it.
    var varintSkip = false
    /// Where the refused varint that the reader is skipping ends (through its last byte, or the
    /// bytes fed so far).
    func varintSkipEnd(from p: Int) -> Int {
        stream[p..<max(p, source.fed)].firstIndex { $0 & 0x80 == 0 }.map { $0 + 1 } ?? max(p, source.fed)
    }

    var steps = 0
    while steps < 64 && !(reader.isAtEOF) {
        steps += 1
        let op = ops.next()
        let n = Int(ops.next()) * (op & 0x40 != 0 ? 513 : 1)
        let skippedBefore = reader.bytesSkipped
        var framePrefix: LengthPrefix? = nil
        if op % 7 != 1 && op % 7 != 6 { varintSkip = false }
        if let h = (reader as? LoopCoreUnderTest)?.harness { trace?("  buffered starts \(h.peek(12)), stream there \(Array(stream[pos..<min(stream.count, pos + 12)]))") }
        trace?("step \(steps): op \(op % 7) (\(op)), n \(n), pos \(pos), buffered \(reader.bufferedCount), fed \(source.fed)")
        do {
            switch op % 7 {
            case 0:
                let v = try reader.readExactly(n)
                try check(v.count == n, "readExactly returned \(v.count) of \(n)")
                try expectAt(v, pos)
                if op & 0x80 != 0 { kept.append((v, pos)) }
                pos += n
            case 1:
                let prefixes: [LengthPrefix] = [.uint8, .uint16(.bigEndian), .uint32(.littleEndian), .uint64(.bigEndian), .varint]
                let prefix = prefixes[Int(op >> 3) % prefixes.count]
                framePrefix = prefix
                if prefix != .varint { varintSkip = false }
                do {
                    // A frame not kept is lent (withNextFrame) half the time: the borrowing
                    // path, with its in-place and gathered cases, against the same stream.
                    let lend = op & 0x80 == 0 && op & 0x40 != 0
                    if let f = try lend ? reader.lendFrame(prefix: prefix).map({ ByteView($0) }) : reader.readFrame(prefix: prefix) {
                        guard let (len, w) = decodePrefix(prefix, at: pos) else { throw InvariantFailure(description: "frame without a complete prefix") }
                        try check(UInt64(f.count) == len, "frame length \(f.count) vs prefix \(len)")
                        try expectAt(f, pos + w)
                        if op & 0x80 != 0 { kept.append((f, pos + w)) }
                        pos += w + f.count
                    } else {
                        try check(pos == source.fed && source.ended, "nil frame before the end")
                    }
                } catch ExactReadError.frameTooLarge(let len, _) where varintSkip && prefix == .varint {
                    // The resumed skip ended: through the refused prefix's last byte.
                    try check(len == .max, "resumed varint skip refused with \(len)")
                    pos = varintSkipEnd(from: pos)
                    varintSkip = false
                } catch ExactReadError.frameTooLarge(let len, _) {
                    guard let (elen, w) = decodePrefix(prefix, at: pos) else { throw InvariantFailure(description: "tooLarge without prefix") }
                    try check(len == elen && (len > UInt64(limit)), "frameTooLarge \(len) vs \(elen)")
                    pos += w  // the prefix is consumed, the body left unread
                }
            case 2:
                let v = try reader.read(upTo: n)
                try check(v.count <= n, "read(upTo:) over the limit")
                try check(!v.isEmpty || n == 0 || source.ended, "empty read(upTo:) before the end")
                try expectAt(v, pos)
                pos += v.count
            case 3:
                try reader.skip(n)
                pos += n
            case 4:
                let bytes = try reader.bytes(n)
                try expectAt(bytes, pos)
                pos += n
            case 5:
                var buf = [UInt8](repeating: 0xEE, count: n)
                try buf.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
                try expectAt(buf, pos)
                pos += n
            default:
                if !kept.isEmpty { kept.removeFirst() }  // release a view
            }
        } catch ExactReadError.incomplete(let partial, let expected) {
            if op % 7 == 3 {
                pos += reader.bytesSkipped - skippedBefore
            } else if op % 7 == 1, let (_, w) = framePrefix.flatMap({ decodePrefix($0, at: pos) }) {
                // The stream ended inside the body: the prefix was consumed, partial is the body.
                try check(partial.count < expected, "incomplete with a full partial")
                try expectAt(partial, pos + w)
                pos += w + partial.count
            } else {
                try check(partial.count < expected, "incomplete with a full partial")
                try expectAt(partial, pos)
                pos += partial.count
            }
            try check(source.ended && pos == source.fed, "incomplete before the end (pos \(pos), fed \(source.fed))")
        } catch let e as Errno {
            try check([.connectionReset, .timedOut, .noMemory].contains(e), "unexpected errno \(e)")
            try interrupted()
        } catch is CancellationError {
            try check(loopCore, "CancellationError from the blocking reader")
            try interrupted()
        }
        /// An error stopped the call: `skip` (and a refused varint's skip) consumed what
        /// `bytesSkipped` says; anything else consumed nothing.
        func interrupted() throws {
            let skipped = reader.bytesSkipped - skippedBefore
            if op % 7 == 3 {
                pos += skipped
            } else if op % 7 == 1 && framePrefix == .varint {
                if skipped > 0 {
                    // Inside a refused prefix: consumed as scanned, all continuation bytes.
                    try check(stream[pos..<(pos + skipped)].allSatisfy { $0 & 0x80 != 0 }, "a varint skip consumed a byte past the prefix")
                    varintSkip = true
                }
                pos += skipped
            } else {
                try check(skipped == 0, "an interrupted call skipped \(skipped) bytes")
            }
        }
        if let failure = (try? { () throws -> Void in for (v, at) in kept { try expectAt(v, at) } }()) == nil ? "a kept view changed" : nil {
            throw InvariantFailure(description: failure)
        }
        try check(pos + reader.bufferedCount == source.fed, "bytes lost: consumed \(pos) + buffered \(reader.bufferedCount) != fed \(source.fed)")
    }
}

#if FUZZING
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// One input, for libFuzzer: an invariant failure is a crash (what libFuzzer reports).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    do {
        try runOne(size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size)))
    } catch let failure as InvariantFailure {
        fatalError("invariant broken: \(failure)")
    } catch {
        fatalError("unexpected error: \(error)")
    }
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`, so the entry point is ours and
// hands over to libFuzzer's driver (LLVMFuzzerRunDriver, libFuzzer's API for custom mains).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32

@main
struct FuzzMain {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv, { fuzzOne($0, $1) }))
    }
}
#else
import Foundation

@main
struct Replay {
    static func main() throws {
        var paths = Array(CommandLine.arguments.dropFirst())
        if paths.isEmpty { paths = ["Fuzz/corpus"] }
        var files: [String] = []
        for p in paths {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: p, isDirectory: &isDir), isDir.boolValue {
                files += try FileManager.default.contentsOfDirectory(atPath: p).sorted().map { p + "/" + $0 }
            } else {
                files.append(p)
            }
        }
        let verbose = ProcessInfo.processInfo.environment["FUZZ_TRACE"] != nil
        for f in files {
            let data = [UInt8](try Data(contentsOf: URL(fileURLWithPath: f)))
            do {
                try runOne(data, trace: verbose ? { FileHandle.standardError.write(($0 + "\n").data(using: .utf8)!) } : nil)
            } catch {
                FileHandle.standardError.write("\(f): \(error)\n".data(using: .utf8)!)
                throw error
            }
        }
        print("replayed \(files.count) inputs, all invariants held")
    }
}
#endif
