#!/usr/bin/env bash
# The README's first command: builds the release binary (fetching cmake and nasm into
# target/tools/ when the machine has neither, see scripts/with-build-tools.sh), then serves the
# bundled sample for two epochs while a consumer reads every batch, and exits when both are done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/with-build-tools.sh cargo build --release
name="demo-$$"   # a name of its own: never collides with a daemon already running
target/release/ringfeed serve --name "$name" --epochs 2 --exit-when-done &
daemon=$!
target/release/ringfeed consume "$name"
wait "$daemon"
