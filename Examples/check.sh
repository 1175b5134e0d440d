#!/usr/bin/env bash
# Runs the examples on generated input and checks what they print (CI step "examples").
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --product exactio-frame-inspect
bin=$(swift build --show-bin-path)/exactio-frame-inspect
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# 900 frames of 0-299 bytes, 4-byte big-endian lengths, and the CRC-32 of all bodies (zlib's).
# (Python here only writes the input and computes the reference CRC; the tool is Swift.)
want=$(python3 - "$dir/frames.bin" <<'PY'
import struct, sys, zlib
sizes = list(range(300)) * 3
bodies = [bytes((i * 7 + n) % 256 for i in range(n)) for n in sizes]
open(sys.argv[1], "wb").write(b"".join(struct.pack(">I", len(b)) + b for b in bodies))
print(format(zlib.crc32(b"".join(bodies)), "x"))
PY
)
out=$("$bin" "$dir/frames.bin")
echo "$out"
grep -qx "frames: 900" <<<"$out"
grep -qx "crc32 of all bodies: $want" <<<"$out"
grep -qx "  256..<512 B: 132" <<<"$out"
# The same through a pipe (stdin), and a truncated stream is an error with a non-zero exit.
cat "$dir/frames.bin" | "$bin" - | grep -qx "frames: 900"
head -c 1000 "$dir/frames.bin" > "$dir/short.bin"
if "$bin" "$dir/short.bin" >/dev/null 2>"$dir/err"; then
    echo "examples: a truncated stream was not reported" >&2
    exit 1
fi
grep -q "stream ended after" "$dir/err"
echo "examples: frame-inspect OK"

# exactio-ingest: the server, driven by its client (good connections and bad peers), stopped
# with SIGTERM, then the file checked frame by frame; then a run stopped mid-traffic, where
# every acknowledged frame must be in the file.
swift build --product exactio-ingest
ingest=$(swift build --show-bin-path)/exactio-ingest
start_server() {
    "$ingest" serve --out "$dir/ingest.bin" >"$dir/server.out" 2>&1 &
    server=$!
    for _ in $(seq 100); do
        port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$dir/server.out")
        [ -n "$port" ] && return 0
        sleep 0.1
    done
    echo "examples: the ingest server did not start" >&2
    cat "$dir/server.out" >&2
    exit 1
}
start_server
"$ingest" client --port "$port" --connections 8 --frames 500 --bad-peers
kill -TERM "$server"
wait "$server" || { echo "examples: the ingest server did not exit 0 on SIGTERM" >&2; cat "$dir/server.out" >&2; exit 1; }
cat "$dir/server.out"
grep -q "^stopped: 4000 frames" "$dir/server.out"
grep -q "exceeds the limit" "$dir/server.out"
"$ingest" verify "$dir/ingest.bin" --connections 8 --frames 500 | grep -qx "verify: 4000 frames, each stored once and intact"

start_server
"$ingest" client --port "$port" --connections 8 --frames 1000000 --record "$dir/acks" &
client=$!
sleep 2
kill -TERM "$server"
wait "$server" || { echo "examples: the ingest server did not exit 0 on SIGTERM mid-traffic" >&2; cat "$dir/server.out" >&2; exit 1; }
wait "$client" && { echo "examples: the client finished a million frames in 2 s?" >&2; exit 1; }
"$ingest" verify "$dir/ingest.bin" --connections 8 --frames 1000000 --acked "$dir/acks"
echo "examples: ingest server OK"
