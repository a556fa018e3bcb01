#!/usr/bin/env bash
# Runs a command with `cmake` and `nasm` on the PATH, fetching them into the repository's
# target/tools/ first when the machine has neither: the vendored libjpeg-turbo that
# turbojpeg-sys builds needs cmake to configure it and nasm for its SIMD code.
#
#   scripts/with-build-tools.sh cargo build --release
#   scripts/with-build-tools.sh            # only prints the directory to put on the PATH
#
# Nothing is installed system-wide and no root is needed:
# - cmake: the self-contained `cmake` wheel from PyPI, unpacked with `pip install --target`;
# - nasm: Debian's package, downloaded with `apt-get download` (into a private package list
#   when the system's list is empty or stale) and unpacked with `dpkg-deb -x`.
# A tool already on the PATH is used as it is. RINGFEED_TOOLS_DIR overrides target/tools/.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${RINGFEED_TOOLS_DIR:-$repo/target/tools}"
bin="$tools/bin"
python="${PYTHON:-python3}"

say() { echo "with-build-tools: $*" >&2; }

fetch_cmake() {
    say "cmake not on the PATH: installing the cmake wheel from PyPI into $tools/cmake"
    rm -rf "$tools/cmake"
    "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$tools/cmake" cmake
    ln -sfn "$tools/cmake/cmake/data/bin/cmake" "$bin/cmake"
}

fetch_nasm() {
    say "nasm not on the PATH: unpacking Debian's nasm package into $tools/nasm"
    local debs="$tools/debs"
    rm -rf "$debs" "$tools/nasm"
    mkdir -p "$debs"
    if ! (cd "$debs" && apt-get download -q nasm >/dev/null 2>&1); then
        # No or an outdated system package list: read a private one (no root, no global change).
        local apt_dir="$tools/apt"
        mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
        local opts=(-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
            -o "Debug::NoLocking=1")
        apt-get "${opts[@]}" -q update >/dev/null
        (cd "$debs" && apt-get "${opts[@]}" -q download nasm >/dev/null)
    fi
    dpkg-deb -x "$debs"/nasm_*.deb "$tools/nasm"
    ln -sfn "$tools/nasm/usr/bin/nasm" "$bin/nasm"
}

mkdir -p "$bin"
# A tool fetched earlier is reused; a broken link (the folder was moved) is fetched again.
if ! command -v cmake >/dev/null && ! "$bin/cmake" --version >/dev/null 2>&1; then fetch_cmake; fi
if ! command -v nasm >/dev/null && ! "$bin/nasm" -v >/dev/null 2>&1; then fetch_nasm; fi

if (($# == 0)); then
    echo "$bin"
else
    PATH="$PATH:$bin" exec "$@"
fi
