#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/) for a bounded time and prints libFuzzer's
# final statistics; exits non-zero if any target found a crash.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 600 s each, every target)
#
# Each target grows fuzz/corpus/<target>/ (not committed) starting from the committed seeds in
# fuzz/seeds/<target>/; crashing inputs land in fuzz/artifacts/<target>/ and logs in
# fuzz/logs/<target>.log. A found crash is fixed in the library, and its input is committed
# under fuzz/regressions/<target>/, which `cargo test --test fuzz_replay` replays.
#
# Toolchain: cargo-fuzz passes `-Zsanitizer=address` and other `-Z` flags that only nightly
# rustc accepts. ringfeed builds with stable Rust and no nightly is installed, so
# RUSTC_BOOTSTRAP=1 lets stable rustc accept them (the stable toolchain ships the ASan runtime);
# that changes nothing else. Set FUZZ_SANITIZER=none to fuzz without AddressSanitizer (about
# twice the executions per second; safe Rust cannot corrupt memory anyway, but libjpeg-turbo's
# FFI boundary is worth the check). Debug assertions (`-a`) are on, so integer overflows
# panic and are found. FUZZ_DEV=1 builds unoptimised (`--dev`): a cheaper build for the CI
# smoke run, far fewer executions per second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${1:-600}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(ring_header tar_reader label decode)
fi
sanitizer=${FUZZ_SANITIZER:-address}
flags=(-a --sanitizer "$sanitizer")
if [[ ${FUZZ_DEV:-0} == 1 ]]; then
    flags+=(--dev)
fi
export RUSTC_BOOTSTRAP=1

command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
}
cargo fuzz build "${flags[@]}"

mkdir -p logs
failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "== fuzz $target for ${seconds}s"
    # -timeout: one input taking over 10 s is a hang worth a report; -rss_limit_mb: the decode
    # target's pixel limit keeps a run far below this, so more means a memory bomb got through.
    if cargo fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"logs/$target.log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$target")
    fi
    # The last coverage line ("#N DONE cov: … corp: …") and the final statistics.
    grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "logs/$target.log" | tail -n 1 || true
    grep -E '^stat::|^Done ' "logs/$target.log" || true
    echo "== $target: $status (log: fuzz/logs/$target.log)"
    if [[ $status == FAILED ]]; then
        grep -E 'panicked at|ERROR: |SUMMARY: |Test unit written to' "logs/$target.log" || true
    fi
done

if ((${#failed[@]})); then
    echo "fuzz: crashes in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} target(s) ran ${seconds}s each without a crash"
