// bench peer: reads FRAMES frames from the connected sockets on descriptors 3 … 3+CONNECTIONS-1
// (default one) with ByteToMessageHandler(LengthFieldBasedFrameDecoder(lengthFieldBitLength:
// .fourBytes)), checks each body's length and marks, and prints bench's CaseResult JSON line.
// Event loops: the number at the end of STRATEGY (`swift-nio-2`: two; `swift-nio`,
// `swift-nio-1`: one); channels are spread over them round-robin (the group's `next()`).
// `reply-swift-nio-N` (the bench's serving case `reply`): every frame is answered with an 8-byte
// ack, the frame's number on its connection (1-based, little-endian), written per frame and
// flushed once per read (channelReadComplete), the last one flushed at once.
//
// usage: NIOPeer STRATEGY TRANSPORT FRAME_BYTES FRAMES [CONNECTIONS]
import Foundation
import NIOCore
import NIOExtras
import NIOPosix
import Synchronization

func status(_ key: String) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        return (Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? -1) * 1024
    }
    return -1
}

func cpu() -> (Double, Double) {
    var ru = rusage()
    getrusage(RUSAGE_SELF.rawValue, &ru)
    return (Double(ru.ru_utime.tv_sec) + Double(ru.ru_utime.tv_usec) / 1e6,
            Double(ru.ru_stime.tv_sec) + Double(ru.ru_stime.tv_usec) / 1e6)
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

let args = CommandLine.arguments
guard args.count >= 5, let n = Int(args[3]), let frames = Int(args[4]) else {
    FileHandle.standardError.write("usage: NIOPeer STRATEGY TRANSPORT FRAME_BYTES FRAMES [CONNECTIONS]\n".data(using: .utf8)!)
    exit(2)
}
let connections = args.count >= 6 ? Int(args[5]) ?? 1 : 1
let loops = max(1, args[1].split(separator: "-").last.flatMap { Int($0) } ?? 1)
let perConnection = frames / connections
let reply = args[1].hasPrefix("reply-")

/// Frames counted across every connection; each connection adds its count once, when it has
/// read its share or closed (channels may be on different event loops).
final class Total: Sendable {
    let got = Atomic<Int>(0)
    let finished = Atomic<Int>(0)
}

final class Counter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let n: Int
    let total: Total
    let done: EventLoopPromise<Int>
    /// This connection's frames (touched on its event loop only).
    var got = 0
    var finished = false

    init(n: Int, total: Total, done: EventLoopPromise<Int>) {
        self.n = n
        self.total = total
        self.done = done
    }

    func finish() {
        guard !finished else { return }
        finished = true
        let all = total.got.add(got, ordering: .relaxed).newValue
        if total.finished.add(1, ordering: .acquiringAndReleasing).newValue == connections { done.succeed(all) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let body = unwrapInboundIn(data)
        let ok = body.withUnsafeReadableBytes { b -> Bool in
            guard b.count == n else { return false }
            if n >= 1 && b[0] != 0x11 { return false }
            if n >= 2 && b[n - 1] != 0x22 { return false }
            if n >= 3 && b[n / 2] != 0x33 { return false }
            return true
        }
        if !ok { done.fail(ChannelError.inappropriateOperationForState); return }
        got += 1
        if reply {
            var ack = context.channel.allocator.buffer(capacity: 8)
            ack.writeInteger(UInt64(got), endianness: .little)
            if got == perConnection {
                // Counted once the last ack is out (the channels are closed after that).
                context.writeAndFlush(wrapOutboundOut(ack)).whenComplete { _ in self.finish() }
            } else {
                context.write(wrapOutboundOut(ack), promise: nil)
            }
            return
        }
        if got == perConnection { finish() }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if reply { context.flush() }
    }

    func channelInactive(context: ChannelHandlerContext) { finish() }
    func errorCaught(context: ChannelHandlerContext, error: Error) { done.fail(error) }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: loops)
let promise = group.next().makePromise(of: Int.self)
let total = Total()
let open = ClientBootstrap(group: group)
    .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(
                ByteToMessageHandler(LengthFieldBasedFrameDecoder(lengthFieldBitLength: .fourBytes)))
            try channel.pipeline.syncOperations.addHandler(Counter(n: n, total: total, done: promise))
        }
    }
let fileHandle = FileHandle(forWritingAtPath: "/proc/self/clear_refs")
fileHandle?.write("5".data(using: .utf8)!)
try? fileHandle?.close()
let base = status("VmRSS")
let (u0, s0) = cpu()
let t0 = now()
var channels: [Channel] = []
for k in 0..<connections { channels.append(try open.withConnectedSocket(dup(3 + Int32(k))).wait()) }
let got = try promise.futureResult.wait()
let secs = now() - t0
let (u1, s1) = cpu()
let peak = status("VmHWM")
for channel in channels { try? channel.close().wait() }
try? group.syncShutdownGracefully()
guard got == perConnection * connections else {
    FileHandle.standardError.write("NIOPeer: read \(got) of \(frames) frames\n".data(using: .utf8)!)
    exit(1)
}
let result: [String: Any] = [
    "strategy": args[1], "transport": args[2], "frameBytes": n, "frames": frames,
    "seconds": secs, "gbPerSecond": Double(n * frames) / secs / 1e9, "framesPerSecond": Double(frames) / secs,
    "peakRSSBytes": peak, "baselineRSSBytes": base, "peakOverFrame": Double(peak - base) / Double(n),
    "cpuUserSeconds": u1 - u0, "cpuSystemSeconds": s1 - s0,
    "note": "SwiftNIO LengthFieldBasedFrameDecoder\(reply ? ", an 8-byte ack per frame" : ""), \(loops) event loop(s), \(connections) connection(s)", "connections": connections,
]
print(String(decoding: try JSONSerialization.data(withJSONObject: result), as: UTF8.self))
