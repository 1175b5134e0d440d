#!/usr/bin/env python3
"""bench peer: CPython's asyncio.StreamReader.readexactly over the streams on descriptors 3 ...

One connection (descriptor 3), or CONNECTIONS connections (descriptors 3 .. 3+CONNECTIONS-1),
each read by its own coroutine on one event loop, FRAMES frames in all. STRATEGY py-uvloop runs
the same code on uvloop's event loop (libuv; `pip install uvloop`), anything else on asyncio's.

Reads FRAMES length-prefixed frames (4-byte big-endian length, then the body), checks each
body's length and marks (first byte 0x11, last 0x22, middle 0x33), and prints one JSON line in
bench's CaseResult schema. Peak memory is this process's own: VmHWM after the run minus VmRSS
at the baseline taken (after /proc/self/clear_refs) once the connection exists.

usage: asyncio_peer.py STRATEGY TRANSPORT FRAME_BYTES FRAMES [CONNECTIONS]
"""
import asyncio
import json
import resource
import socket
import sys
import time


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def read_frames(reader, n, count):
    got = 0
    while got < count:
        hdr = await reader.readexactly(4)
        size = int.from_bytes(hdr, "big")
        body = await reader.readexactly(size)
        if size != n or (n >= 1 and body[0] != 0x11) or (n >= 2 and body[-1] != 0x22) or (n >= 3 and body[n // 2] != 0x33):
            raise SystemExit("frame content or length wrong")
        del body
        got += 1
    return got


async def main(strategy, transport, n, frames, connections):
    streams = []
    for k in range(connections):
        sock = socket.socket(fileno=3 + k)
        if transport == "unix":
            streams.append(await asyncio.open_unix_connection(sock=sock))
        else:
            streams.append(await asyncio.open_connection(sock=sock))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    u0, s0 = cpu()
    t0 = time.monotonic()
    per = frames // connections
    got = sum(await asyncio.gather(*(read_frames(r, n, per) for r, _ in streams)))
    secs = time.monotonic() - t0
    u1, s1 = cpu()
    peak = status("VmHWM")
    for _, writer in streams:
        writer.close()
    print(json.dumps({
        "strategy": strategy, "transport": transport, "frameBytes": n, "frames": frames,
        "seconds": secs, "gbPerSecond": n * frames / secs / 1e9, "framesPerSecond": frames / secs,
        "peakRSSBytes": peak, "baselineRSSBytes": base, "peakOverFrame": (peak - base) / n,
        "cpuUserSeconds": u1 - u0, "cpuSystemSeconds": s1 - s0,
        "note": "CPython %d.%d.%d asyncio readexactly, %s" % (*sys.version_info[:3], loop_name()), "connections": connections,
    }))


def loop_name():
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        import uvloop
        return "uvloop %s event loop" % uvloop.__version__
    return "asyncio %s" % type(loop).__name__


if __name__ == "__main__":
    conns = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    coro = main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), conns)
    if sys.argv[1] == "py-uvloop":
        import uvloop
        if hasattr(asyncio, "Runner"):  # 3.11+: a loop factory, no global policy
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(coro)
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.run(coro)
    else:
        asyncio.run(coro)
