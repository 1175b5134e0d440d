#!/usr/bin/env bash
# Runs the libFuzzer target for SECONDS (default 60) on Fuzz/corpus.
#   bash Fuzz/run.sh [SECONDS] [extra libFuzzer flags...]
# Builds (release, -sanitize=fuzzer,address, linked with lld: gold fails on this mix) into
# .build-fuzz, a scratch path of its own. New inputs go to .build-fuzz/corpus (not
# committed); a crash is written to .build-fuzz/crash-* and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
flags=(-c release --scratch-path .build-fuzz --product fuzz-exactio
       -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -use-ld=lld)
swift build "${flags[@]}" 2>&1 | grep -v "Cannot export local symbol" >&2
bin="$(swift build "${flags[@]}" --show-bin-path)/fuzz-exactio"
mkdir -p .build-fuzz/corpus
"$bin" -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix=.build-fuzz/ \
    "$@" .build-fuzz/corpus Fuzz/corpus
