import ExactIO
import ExactIOBenchCeiling
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage

/// The receive size asyncio's selector transport uses (`max_size = 256 * 1024`).
let recvSize = 256 << 10

/// One read(2), retrying EINTR. Returns bytes read, 0 at EOF.
@inline(__always)
func sysRead(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) throws -> Int {
    while true {
        let n = read(fd, p, count)
        if n >= 0 { return n }
        if errno != EINTR { throw BenchFailure("read: errno \(errno)") }
    }
}

func decodeLength(_ p: UnsafeRawBufferPointer) -> Int {
    Int(p[0]) << 24 | Int(p[1]) << 16 | Int(p[2]) << 8 | Int(p[3])
}

func checkFrame(_ body: UnsafeRawBufferPointer, _ n: Int) throws {
    guard Marks.check(body, n) else { throw BenchFailure("frame content or length wrong (\(body.count) of \(n))") }
}

/// The frame loop of the seed strategies: header through `readExactly(4)`, then the body.
func readFrames(_ c: BenchCase, _ readExactly: (Int) throws -> [UInt8]?) throws -> Int {
    var frames = 0
    while frames < c.frames, let hdr = try readExactly(4) {
        let n = hdr.withUnsafeBytes(decodeLength)
        guard let body = try readExactly(n) else { break }
        try body.withUnsafeBytes { try checkFrame($0, n) }
        frames += 1
    }
    return frames
}

/// seed-join: asyncio's original readexactly. Every recv is a fresh chunk; a read collects
/// pieces of chunks until it has n bytes, then joins them into one new array.
/// Copies per byte: kernel → chunk, chunk → joined result. Peak ~2n.
func seedJoin(fd: Int32, c: BenchCase) throws -> Int {
    var chunks: [ArraySlice<UInt8>] = []  // unconsumed received data, oldest first
    var head = 0  // index into chunks
    func readExactly(_ n: Int) throws -> [UInt8]? {
        var blocks: [ArraySlice<UInt8>] = []
        var need = n
        while need > 0 {
            if head == chunks.count {
                chunks.removeAll(keepingCapacity: true)
                head = 0
                let chunk = try [UInt8](unsafeUninitializedCapacity: recvSize) { buf, count in
                    count = try sysRead(fd, buf.baseAddress!, recvSize)
                }
                if chunk.isEmpty { return nil }
                chunks.append(chunk[...])
            }
            let piece = chunks[head]
            if piece.count <= need {
                blocks.append(piece)
                need -= piece.count
                head += 1
            } else {
                blocks.append(piece.prefix(need))
                chunks[head] = piece.dropFirst(need)
                need = 0
            }
        }
        if blocks.count == 1 { return Array(blocks[0]) }  // b''.join of one block still copies
        var joined = [UInt8]()
        joined.reserveCapacity(n)
        for b in blocks { joined.append(contentsOf: b) }
        return joined
    }
    return try readFrames(c, readExactly)
}

/// A growable receive buffer with a consumed-prefix offset (bytearray's ob_start trick).
struct GrowBuffer {
    var storage: [UInt8] = []
    var start = 0
    var count: Int { storage.count - start }

    /// recv into a reused chunk, then append (the append is the user-space copy CPython's
    /// feed_data makes with bytearray.extend).
    mutating func feed(from fd: Int32, chunk: inout [UInt8]) throws -> Bool {
        let n = try chunk.withUnsafeMutableBytes { try sysRead(fd, $0.baseAddress!, $0.count) }
        if n == 0 { return false }
        if start > 0 && start >= storage.count / 2 {
            storage.removeFirst(start)
            start = 0
        }
        storage.append(contentsOf: chunk[0..<n])
        return true
    }

    mutating func take(_ n: Int) -> [UInt8] {
        let out = Array(storage[start..<(start + n)])
        start += n
        if start == storage.count {
            storage.removeAll(keepingCapacity: true)
            start = 0
        }
        return out
    }
}

/// seed-buffer: CPython's readexactly today. One bytearray grows until it holds n bytes, then
/// the frame is copied out into an immutable bytes. Copies: kernel → chunk → buffer → result.
func seedBuffer(fd: Int32, c: BenchCase) throws -> Int {
    var buffer = GrowBuffer()
    var chunk = [UInt8](repeating: 0, count: recvSize)
    func readExactly(_ n: Int) throws -> [UInt8]? {
        while buffer.count < n {
            if !(try buffer.feed(from: fd, chunk: &chunk)) { return nil }
        }
        return buffer.take(n)
    }
    return try readFrames(c, readExactly)
}

/// seed-prealloc: the proposal in python/asyncio#394. When the buffer holds n bytes, slice
/// them out (a copy, as a bytearray slice is); otherwise allocate bytearray(n) (zeroed),
/// copy what is buffered, and recv_into the rest in place. Peak n; result mutable.
func seedPrealloc(fd: Int32, c: BenchCase, deliver: (([UInt8]) throws -> Void)? = nil) throws -> Int {
    var buffer = GrowBuffer()
    var chunk = [UInt8](repeating: 0, count: recvSize)
    func readExactly(_ n: Int) throws -> [UInt8]? {
        if buffer.count >= n { return buffer.take(n) }
        var out = [UInt8](repeating: 0, count: n)
        var have = buffer.count
        if have > 0 {
            out.withUnsafeMutableBytes { dst in
                buffer.storage.withUnsafeBytes { src in
                    dst.baseAddress!.copyMemory(from: src.baseAddress! + buffer.start, byteCount: have)
                }
            }
            buffer.storage.removeAll(keepingCapacity: true)
            buffer.start = 0
        }
        try out.withUnsafeMutableBytes { dst in
            while have < n {
                let k = try sysRead(fd, dst.baseAddress! + have, n - have)
                if k == 0 { return }
                have += k
            }
        }
        if have < n { return nil }
        return out
    }
    var frames = 0
    while frames < c.frames {
        // Headers come through the buffer (the stream reader's normal path).
        while buffer.count < 4 {
            if !(try buffer.feed(from: fd, chunk: &chunk)) { return frames }
        }
        let hdr = buffer.take(4)
        let n = hdr.withUnsafeBytes(decodeLength)
        guard let body = try readExactly(n) else { break }
        try body.withUnsafeBytes { try checkFrame($0, n) }
        try deliver?(body)
        frames += 1
    }
    return frames
}

/// posix-into: the floor. read(2) the 4-byte header, then read(2) the body straight into one
/// reused, page-aligned buffer of exactly the frame size, allocated and pre-faulted before the
/// clock starts.
func makeFloorBuffer(_ c: BenchCase) -> UnsafeMutableRawBufferPointer {
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: max(c.frameBytes, 1), alignment: 4096)
    memset(buf.baseAddress!, 0, buf.count)  // pre-fault
    return buf
}

func posixInto(fd: Int32, c: BenchCase, buf: UnsafeMutableRawBufferPointer) throws -> Int {
    var hdr: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
    func readFull(_ p: UnsafeMutableRawPointer, _ n: Int) throws -> Bool {
        var got = 0
        while got < n {
            let k = try sysRead(fd, p + got, n - got)
            if k == 0 { return false }
            got += k
        }
        return true
    }
    var frames = 0
    while frames < c.frames {
        let ok = try withUnsafeMutableBytes(of: &hdr) { try readFull($0.baseAddress!, 4) }
        if !ok { break }
        let n = withUnsafeBytes(of: &hdr) { decodeLength($0) }
        guard n <= buf.count, try readFull(buf.baseAddress!, n) else { break }
        try checkFrame(UnsafeRawBufferPointer(rebasing: buf[0..<n]), n)
        frames += 1
    }
    return frames
}

/// c-readahead / c-readahead-uring: the C ceiling (Benchmarks/ceiling). Its buffer is
/// allocated, pre-faulted (and registered) before the clock starts.
func prepareCeiling(_ c: BenchCase, fd: Int32, uring: Bool) throws -> PreparedStrategy {
    guard let ceiling = exio_ceiling_create(fd, UInt64(c.frameBytes), uring ? 1 : 0) else {
        throw BenchFailure("\(c.strategy): setup failed, errno \(errno)")
    }
    return PreparedStrategy(run: {
        defer { exio_ceiling_destroy(ceiling) }
        let n = exio_ceiling_run(ceiling, Int64(c.frames))
        if n < 0 { throw BenchFailure("\(c.strategy): errno \(-n)") }
        return Int(n)
    })
}

/// ExactIO's staging capacity in the bench: the default (256 KiB), or EXACTIO_BENCH_STAGING
/// bytes (for the read-size analysis in the README).
let benchStaging: Int = getenv("EXACTIO_BENCH_STAGING").flatMap { Int(String(cString: $0)) } ?? ExactReader.Options().stagingCapacity

/// exactio-posix / exactio-uring: ExactReader.readFrame, each frame a read-only view.
/// The reader is created before the clock starts (its staging buffer counts in the peak).
func makeReader(fd: Int32, backend: ExactReader.Backend) throws -> ExactReader {
    var o = ExactReader.Options(backend: backend, stagingCapacity: benchStaging, maxFrameLength: 1 << 30)
    if let depth = benchQueueDepth { o.queueDepth = depth }
    return try ExactReader(FileDescriptor(rawValue: fd), options: o)
}

/// ExactIO's reads in flight for files in the bench: the default, or EXACTIO_BENCH_QUEUE_DEPTH
/// (how the default was chosen: README "Files").
let benchQueueDepth: Int? = getenv("EXACTIO_BENCH_QUEUE_DEPTH").flatMap { Int(String(cString: $0)) }

func exactIO(_ reader: ExactReader, c: BenchCase) throws -> Int {
    var frames = 0
    while frames < c.frames, let frame = try reader.readFrame() {
        try frame.withUnsafeBytes { try checkFrame($0, c.frameBytes) }
        frames += 1
    }
    return frames
}

/// exactio-borrow: ExactReader.forEachFrame, each frame lent as a RawSpan (no view).
func exactIOBorrow(_ reader: ExactReader, c: BenchCase) throws -> Int {
    var frames = 0
    try reader.forEachFrame { (frame: RawSpan) throws -> Bool in
        try frame.withUnsafeBytes { try checkFrame($0, c.frameBytes) }
        frames += 1
        return frames < c.frames
    }
    return frames
}

func describe(_ reader: ExactReader) -> String {
    let s = reader.statistics
    var note = "\(reader.backend): reads \(s.reads), fixed \(s.fixedReads), copied \(s.bytesCopied), staged views \(s.stagedViews)"
    if let why = reader.fallbackReason { note += "; \(why)" }
    return note
}

/// A strategy ready to read: `run` reads every frame and returns how many; `note` describes
/// what ExactIO did (nil for the others).
struct PreparedStrategy {
    var run: () throws -> Int
    var note: () -> String? = { nil }
}

/// Sets a strategy up on `fd`. What this allocates (the floor's pre-faulted buffer, a reader
/// and its reserved frame memory) counts in the peak but not in the time.
func prepare(_ c: BenchCase, fd: Int32) throws -> PreparedStrategy {
    switch c.strategy {
    case "seed-join": return PreparedStrategy(run: { try seedJoin(fd: fd, c: c) })
    case "seed-buffer": return PreparedStrategy(run: { try seedBuffer(fd: fd, c: c) })
    case "seed-prealloc": return PreparedStrategy(run: { try seedPrealloc(fd: fd, c: c) })
    case "posix-into" where c.transport != "direct":
        let buffer = makeFloorBuffer(c)
        return PreparedStrategy(run: {
            defer { buffer.deallocate() }
            return try posixInto(fd: fd, c: c, buf: buffer)
        })
    case "posix-into" where c.transport == "direct":
        // O_DIRECT: the floor is one aligned pread(2) per frame (the C ceiling's direct mode
        // without io_uring), as no unaligned read(2) is allowed.
        return try prepareCeiling(c, fd: fd, uring: false)
    case "c-readahead": return try prepareCeiling(c, fd: fd, uring: false)
    case "c-pread":
        return PreparedStrategy(run: {
            let n = exio_pread_run(fd, UInt64(c.frameBytes), Int64(c.frames), UInt64(randomFileBytes - c.frameBytes), 42)
            if n < 0 { throw BenchFailure("c-pread: errno \(-n)") }
            return Int(n)
        })
    case "exactio-pread-posix", "exactio-pread-uring":
        let reader = try makeReader(fd: fd, backend: c.strategy.hasSuffix("uring") ? .ioUring : .posix)
        return PreparedStrategy(run: {
            var state: UInt64 = 42
            let span = UInt64(randomFileBytes - c.frameBytes)
            var sum = 0
            for _ in 0..<c.frames {
                let record = try reader.readExactly(c.frameBytes, at: Int64(exio_splitmix(&state) % span))
                sum &+= Int(record[0])
            }
            blackHole(sum)
            return c.frames
        }, note: { describe(reader) })
    case "forward-readwrite", "forward-seed", "exactio-forward", "exactio-forward-posix":
        return try prepareForward(c, fd: fd)
    case "c-readahead-uring": return try prepareCeiling(c, fd: fd, uring: true)
    case "exactio-posix", "exactio-uring", "exactio-borrow":
        // exactio-borrow runs on the default backend (io_uring where it works).
        let reader = try makeReader(fd: fd, backend: c.strategy == "exactio-posix" ? .posix : c.strategy == "exactio-uring" ? .ioUring : .automatic)
        // Frame memory before the clock, as posix-into's pre-faulted buffer is.
        try reader.reserve(c.frameBytes)
        let read = c.strategy == "exactio-borrow" ? exactIOBorrow : exactIO
        return PreparedStrategy(run: { try read(reader, c) }, note: { describe(reader) })
    default:
        throw BenchFailure("unknown strategy \(c.strategy)")
    }
}

/// Runs one case in this (child) process and returns its result.
func runCase(_ c: BenchCase) throws -> CaseResult {
    warmUp(c)
    let (fd, writer) = try openTransport(c)
    defer {
        close(fd)
        if writer > 0 { waitExit(writer) }
    }
    var note: (() -> String?)? = nil
    var r = try measure(c, fd: fd, setup: { try prepare(c, fd: fd) }) { prepared in
        note = prepared.note
        return try prepared.run()
    }
    r.note = note?()
    return r
}

/// Runs the strategy's code once over a small in-process stream before anything is measured,
/// so that first-use costs (code pages, runtime metadata) land outside every strategy's
/// baseline alike, as in swift-nio's performance tester.
func warmUp(_ c: BenchCase) {
    var sv: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0 else { return }
    defer { close(sv[0]) }
    let n = min(c.frameBytes, 64 << 10)
    let wire = Marks.frame(n) + Marks.frame(n)
    var size = Int32(1 << 20)
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    guard (try? wire.withUnsafeBytes({ try writeAll(sv[1], $0.baseAddress!, $0.count) })) != nil else { return }
    close(sv[1])
    let w = BenchCase(strategy: c.strategy, transport: c.transport, frameBytes: n, frames: 2)
    _ = try? prepare(w, fd: sv[0]).run()
}

/// The destination of the tcp-to-file cases: a new, unlinked file in /dev/shm (memory: no
/// writeback to shape the figures).
func forwardDestination() throws -> Int32 {
    let path = "/dev/shm/exactio-bench-forward-\(getpid())"
    let out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard out >= 0 else { throw BenchFailure("open \(path): errno \(errno)") }
    unlink(path)
    return out
}

/// tcp-to-file: each frame's header is read, then its body goes to the file.
func prepareForward(_ c: BenchCase, fd: Int32) throws -> PreparedStrategy {
    let out = try forwardDestination()
    switch c.strategy {
    case "exactio-forward", "exactio-forward-posix":
        let reader = try makeReader(fd: fd, backend: c.strategy == "exactio-forward" ? .automatic : .posix)
        return PreparedStrategy(run: {
            defer { close(out) }
            var frames = 0
            while frames < c.frames, reader.isAtEOF == false {
                let n = try reader.readExactly(4).withUnsafeBytes(decodeLength)
                guard n == c.frameBytes else { throw BenchFailure("frame length \(n)") }
                try reader.forward(exactly: n, to: FileDescriptor(rawValue: out))
                frames += 1
            }
            return frames
        }, note: { describe(reader) })
    case "forward-seed":
        return PreparedStrategy(run: {
            defer { close(out) }
            return try seedPrealloc(fd: fd, c: c) { body in
                try body.withUnsafeBytes { try writeAll(out, $0.baseAddress!, $0.count) }
            }
        })
    default:  // forward-readwrite
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 4096)
        memset(buffer.baseAddress!, 0, buffer.count)
        return PreparedStrategy(run: {
            defer { close(out); buffer.deallocate() }
            var frames = 0
            var hdr: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
            while frames < c.frames {
                var got = 0
                while got < 4 {
                    let k = try withUnsafeMutableBytes(of: &hdr) { try sysRead(fd, $0.baseAddress! + got, 4 - got) }
                    if k == 0 { return frames }
                    got += k
                }
                var left = withUnsafeBytes(of: &hdr) { decodeLength($0) }
                while left > 0 {
                    let k = try sysRead(fd, buffer.baseAddress!, min(left, buffer.count))
                    if k == 0 { return frames }
                    try writeAll(out, buffer.baseAddress!, k)
                    left -= k
                }
                frames += 1
            }
            return frames
        })
    }
}

/// Keeps a value alive for the optimizer.
@inline(never)
func blackHole(_ x: Int) {
    if x == 0x7fff_ffff_ffff_fff1 { print("") }
}
