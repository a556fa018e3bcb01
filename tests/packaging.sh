#!/usr/bin/env bash
# A newcomer's first hour, checked end to end (tests/run_all.sh runs it first, so in a fresh
# clone the release build below is the first one and really builds libjpeg-turbo):
# 1. The README's first command (scripts/demo.sh) on a PATH without cmake and nasm: they are
#    fetched into a fresh tools folder, and the demo serves and consumes two epochs.
# 2. `pip wheel ./clients/python` gives a wheel holding the `ringfeed` binary; in a fresh venv,
#    `pip install ./clients/python` gives a working `ringfeed` command and `import ringfeed`
#    whose versions agree; `ringfeed serve` with no arguments serves the bundled sample from
#    another directory; `ringfeed.serve(...)` serves an epoch to a script outside the repository.
# 3. The wheel is installed into this Python for the client's tests (as users install it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
work="$(mktemp -d /tmp/rf-newcomer.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# A PATH of links to every command on the current PATH except cmake and nasm.
mkdir -p "$work/bin"
IFS=: read -ra dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
    for tool in "$dir"/*; do
        name="$(basename "$tool")"
        case "$name" in cmake | nasm | cpack | ctest) continue ;; esac
        if [[ -x "$tool" && ! -e "$work/bin/$name" ]]; then ln -s "$tool" "$work/bin/$name"; fi
    done
done
bare_path="$work/bin"
if PATH="$bare_path" command -v cmake || PATH="$bare_path" command -v nasm; then
    echo "cmake or nasm is still on the stripped PATH"; exit 1
fi

echo "== README's first command without cmake and nasm on the PATH"
export RINGFEED_TOOLS_DIR="$work/tools"
export RINGFEED_RUNTIME_DIR="$work/run"
caches=(target/release/build/turbojpeg-sys-*/out/build/CMakeCache.txt)
PATH="$bare_path" bash scripts/demo.sh >"$work/demo.log" 2>&1 || { cat "$work/demo.log"; exit 1; }
test -x "$work/tools/bin/cmake" && test -x "$work/tools/bin/nasm"
# When this build compiled libjpeg-turbo (always in a fresh clone), it used the fetched tools.
for cache in target/release/build/turbojpeg-sys-*/out/build/CMakeCache.txt; do
    [[ " ${caches[*]} " == *" $cache "* ]] && continue
    grep -q "^CMAKE_ASM_NASM_COMPILER:FILEPATH=$work/tools/bin/nasm$" "$cache"
    grep -q "^CMAKE_COMMAND:INTERNAL=$work/tools/" "$cache"
    echo "libjpeg-turbo was built with the fetched cmake and nasm ($cache)"
done
grep -E "^consumed [0-9]+ batches" "$work/demo.log"

echo "== pip wheel ./clients/python holds the daemon"
rm -rf target/wheels
PATH="$bare_path" python3 -m pip wheel -q --disable-pip-version-check --no-deps \
    -w target/wheels ./clients/python
wheel="$(ls target/wheels/ringfeed-*.whl)"
python3 -m zipfile -l "$wheel" | grep -E "ringfeed-[^/]+\.data/scripts/ringfeed "

echo "== fresh venv: pip install ./clients/python"
python3 -m venv "$work/venv"
PATH="$bare_path" "$work/venv/bin/pip" install -q --disable-pip-version-check ./clients/python
cd "$work"   # from here on, away from the repository
cli_version="$("$work/venv/bin/ringfeed" --version)"
py_version="$("$work/venv/bin/python" -c 'import ringfeed; print(ringfeed.__version__)')"
[[ "$cli_version" == "ringfeed $py_version" ]] || { echo "versions differ: $cli_version vs $py_version"; exit 1; }
echo "ringfeed --version: $cli_version; ringfeed.__version__: $py_version"

echo "== ringfeed serve with no arguments, from another directory"
mkdir -p -m 700 "$RINGFEED_RUNTIME_DIR"
"$work/venv/bin/ringfeed" serve --epochs 1 --exit-when-done >"$work/serve.log" 2>&1 &
daemon=$!
"$work/venv/bin/python" - <<'PY'
import ringfeed
with ringfeed.Loader("default", wait_for_producer=120) as loader:
    batches, expected = sum(1 for _ in loader), len(loader)
assert batches == expected > 0, (batches, expected)
print(f"read {batches} batches of the bundled sample")
PY
wait "$daemon" || { cat "$work/serve.log"; exit 1; }

echo "== ringfeed.serve() from a script outside the repository"
cat >"$work/train.py" <<'PY'
import ringfeed

with ringfeed.serve(name="newcomer", epochs=1) as daemon:
    with daemon.loader() as loader:
        batches, expected = sum(1 for _ in loader), len(loader)
    assert batches == expected > 0, (batches, expected)
print(f"ringfeed.serve: daemon pid {daemon.pid} served {batches} batches")
PY
"$work/venv/bin/python" "$work/train.py" 2>"$work/train.log" || { cat "$work/train.log"; exit 1; }
cd "$repo"

echo "== the client for the tests: this wheel, into $(command -v python3)"
python3 -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
