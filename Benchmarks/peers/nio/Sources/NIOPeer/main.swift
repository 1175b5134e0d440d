// bench peer: reads FRAMES frames from the connected socket on descriptor 3 with
// ByteToMessageHandler(LengthFieldBasedFrameDecoder(lengthFieldBitLength: .fourBytes)) on one
// event loop, checks each body's length and marks, and prints bench's CaseResult JSON line.
//
// usage: NIOPeer STRATEGY TRANSPORT FRAME_BYTES FRAMES
import Foundation
import NIOCore
import NIOExtras
import NIOPosix

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
guard args.count == 5, let n = Int(args[3]), let frames = Int(args[4]) else {
    FileHandle.standardError.write("usage: NIOPeer STRATEGY TRANSPORT FRAME_BYTES FRAMES\n".data(using: .utf8)!)
    exit(2)
}

final class Counter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let expected: Int
    let n: Int
    var got = 0
    let done: EventLoopPromise<Int>

    init(n: Int, expected: Int, done: EventLoopPromise<Int>) {
        self.n = n
        self.expected = expected
        self.done = done
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
        if got == expected { done.succeed(got) }
    }

    func channelInactive(context: ChannelHandlerContext) { done.succeed(got) }
    func errorCaught(context: ChannelHandlerContext, error: Error) { done.fail(error) }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let promise = group.next().makePromise(of: Int.self)
let counter = Counter(n: n, expected: frames, done: promise)
let fdCopy = dup(3)
let open = ClientBootstrap(group: group)
    .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(
                ByteToMessageHandler(LengthFieldBasedFrameDecoder(lengthFieldBitLength: .fourBytes)))
            try channel.pipeline.syncOperations.addHandler(counter)
        }
    }
let fileHandle = FileHandle(forWritingAtPath: "/proc/self/clear_refs")
fileHandle?.write("5".data(using: .utf8)!)
try? fileHandle?.close()
let base = status("VmRSS")
let (u0, s0) = cpu()
let t0 = now()
let channel = try open.withConnectedSocket(fdCopy).wait()
let got = try promise.futureResult.wait()
let secs = now() - t0
let (u1, s1) = cpu()
let peak = status("VmHWM")
try? channel.close().wait()
try? group.syncShutdownGracefully()
guard got == frames else {
    FileHandle.standardError.write("NIOPeer: read \(got) of \(frames) frames\n".data(using: .utf8)!)
    exit(1)
}
let result: [String: Any] = [
    "strategy": args[1], "transport": args[2], "frameBytes": n, "frames": frames,
    "seconds": secs, "gbPerSecond": Double(n * frames) / secs / 1e9, "framesPerSecond": Double(frames) / secs,
    "peakRSSBytes": peak, "baselineRSSBytes": base, "peakOverFrame": Double(peak - base) / Double(n),
    "cpuUserSeconds": u1 - u0, "cpuSystemSeconds": s1 - s0,
    "note": "SwiftNIO LengthFieldBasedFrameDecoder, 1 event loop",
]
print(String(decoding: try JSONSerialization.data(withJSONObject: result), as: UTF8.self))
