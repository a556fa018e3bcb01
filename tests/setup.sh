#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine (Rust via rustup, Python 3 with pip,
# apt): tests/run_all.sh runs it first. Nothing is reinstalled that is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# cmake + nasm build the vendored libjpeg-turbo (turbojpeg-sys): fetched into target/tools/
# when missing (scripts/with-build-tools.sh); run_all.sh puts that folder on the PATH.
scripts/with-build-tools.sh >/dev/null

# The C client (clients/c, built by run_all.sh): a C11 compiler and make. cc is there wherever
# cargo links; make is not on a minimal Debian.
if ! command -v make >/dev/null || ! command -v cc >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q >/dev/null
    $sudo apt-get install -y -q --no-install-recommends make gcc libc6-dev >/dev/null
fi

# Rust components the checks use.
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --version >/dev/null
cargo clippy --version >/dev/null
# The declared minimum Rust (Cargo.toml `rust-version`), which run_all.sh checks still builds.
msrv="$(sed -n 's/^rust-version = "\([^"]*\)".*/\1/p' Cargo.toml)"
rustup run "$msrv" rustc --version >/dev/null 2>&1 \
    || rustup toolchain install "$msrv" --profile minimal --no-self-update >/dev/null

# cargo-fuzz for the fuzz smoke run (scripts/fuzz.sh).
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Python test tools. The client itself is installed by tests/packaging.sh, the way users do.
python3 -m pip install -q --disable-pip-version-check numpy pytest
# The Python client's lint, format and type checks (run_all.sh), pinned: a new release's rules
# must not turn CI red without a change here.
python3 -m pip install -q --disable-pip-version-check 'ruff==0.17.6' 'mypy==2.4.1'
# torch (CPU use only): the client's torch paths, batch.to(..., normalize=True) against a real
# f32 ring, and benches/gpu/check.py's dry path run with it.
python3 -m pip install -q --disable-pip-version-check torch
# scikit-learn: its bundled digits are the real data of benches/infobatch/digits.py (smoke in CI).
python3 -m pip install -q --disable-pip-version-check scikit-learn
# moto[server]: the local S3-compatible server tests/remote_s3.rs serves s3:// shards from.
python3 -m pip install -q --disable-pip-version-check 'moto[server]'
