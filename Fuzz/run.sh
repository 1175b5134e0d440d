#!/usr/bin/env bash
# Runs the libFuzzer target for SECONDS (default 60) on Fuzz/corpus.
#   bash Fuzz/run.sh [SECONDS] [extra libFuzzer flags...]
# Builds with -sanitize=fuzzer,address into .build-fuzz (a scratch path of its own). New inputs
# go to .build-fuzz/corpus (not committed); crashes to .build-fuzz/crash-*.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
swift build --scratch-path .build-fuzz --product fuzz-exactio \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING >&2
bin=$(swift build --scratch-path .build-fuzz --product fuzz-exactio --show-bin-path \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING)/fuzz-exactio
mkdir -p .build-fuzz/corpus
# ASan's leak check at exit is on; a libFuzzer run ends with its own statistics line.
"$bin" -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix=.build-fuzz/ \
    "$@" .build-fuzz/corpus Fuzz/corpus
