#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on stable Rust and runs each for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60 (CI may pass a few seconds: a smoke run). Each target
# starts from its corpus in fuzz/corpus/<target> (seeded from real traffic by the server's
# `fuzz_seeds` example, kept between runs) and prints its executions. A crash stops the run, leaves
# the input in fuzz/artifacts/<target>/ and fails the script: turn it into a regression test.
#
# Needs only cargo and a C++ compiler (libfuzzer-sys builds libFuzzer from source); on stable
# Rust, coverage comes from LLVM's sanitizer-coverage passes, without a sanitizer.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(channel_frames noise_responder mls_peek append_decision rpc_messages)
fi
if ! command -v c++ >/dev/null 2>&1; then
    apt-get install -y g++ >/dev/null
fi
# Seeds from real traffic, built like the project (no instrumentation).
mkdir -p corpus artifacts
(cd .. && cargo run -q --locked -p quicproquo-server --example fuzz_seeds -- fuzz/corpus)
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cdebug-assertions -Coverflow-checks"
# With an explicit target, the flags reach the fuzzed code only, not build scripts or macros.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --locked --release --bins --target "$host" -j "${FUZZ_JOBS:-2}"
bin="$CARGO_TARGET_DIR/$host/release"
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.log"
    if ! "$bin/$t" "corpus/$t" \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=4096 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
        echo "FAIL $t: see fuzz/$log and fuzz/artifacts/$t/"
        tail -40 "$log"
        status=1
    fi
    runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    echo "$t: ${runs:-?} executions in ${secs}s"
done
exit $status
