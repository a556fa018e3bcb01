#!/usr/bin/env bash
# The whole test suite: formatting, lints, Rust unit + multi-process tests, the Python client's
# tests against the real daemon, and the CI smoke benchmark. The README's test command: it
# first installs what it needs (tests/setup.sh), so it runs alone on a fresh machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== installing what the tests need (tests/setup.sh)"
bash tests/setup.sh
PATH="$PATH:$(scripts/with-build-tools.sh)"   # cmake + nasm, fetched when the machine had none
echo "== a newcomer's first hour: the demo without cmake/nasm, pip wheel, fresh venv (tests/packaging.sh)"
bash tests/packaging.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
msrv="$(sed -n 's/^rust-version = "\([^"]*\)".*/\1/p' Cargo.toml)"
echo "== cargo +$msrv check --all-targets (the declared rust-version still builds)"
cargo +"$msrv" check --all-targets
echo "== Python client: ruff check, ruff format --check, mypy --strict (src, tests, examples)"
(cd clients/python && python3 -m ruff check src tests examples \
    && python3 -m ruff format --check src tests examples \
    && python3 -m mypy --strict src tests examples)
echo "== cargo test (unit, integration, multi-process and example tests; clippy above compiled the benches)"
cargo test --lib --bins --tests --examples
# `cargo test` built target/debug/ringfeed for the integration tests (with the same features:
# a separate `cargo build` would recompile the dependencies without the dev-dependencies'
# features), so the Python tests use that binary.
test -x target/debug/ringfeed
echo "== pytest clients/python"
RINGFEED_BIN="$PWD/target/debug/ringfeed" python3 -m pytest -q clients/python/tests
echo "== C client (make -C clients/c, warnings are errors); one contract, three clients (tests/conformance/run.py)"
make -C clients/c
python3 tests/conformance/run.py --bin "$PWD/target/debug/ringfeed" --c clients/c/read_batches
RINGFEED_BIN="$PWD/target/debug/ringfeed" python3 benches/compare/compare.py --smoke  # CI smoke of the head-to-head (ringfeed alone, tiny data)
RINGFEED_BIN="$PWD/target/debug/ringfeed" python3 benches/compare/compare.py --smoke --policy  # the same with the DeiT-style policy pipeline
python3 benches/gpu/check.py --out "$(mktemp -d)/gpu-check.json"  # GPU check: its dry path without a GPU
python3 benches/soak/soak.py --smoke --bin "$PWD/target/debug/ringfeed"  # CI smoke of the soak (3 short epochs, throughput not judged)
python3 benches/infobatch/digits.py --smoke --bin "$PWD/target/debug/ringfeed"  # CI smoke of the InfoBatch experiment (1 seed, 3 epochs)
echo "== fuzz smoke: each cargo-fuzz target on its seed corpus for a few seconds"
# Unoptimised and without ASan: a third of the release+ASan build's CPU time, enough to show
# every target builds and runs its seeds; scripts/fuzz.sh without these is for real runs.
FUZZ_DEV=1 FUZZ_SANITIZER=none scripts/fuzz.sh 5
