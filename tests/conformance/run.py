#!/usr/bin/env python3
"""One contract, every client: runs the same finite ring through each client's conformance
reader (Rust `ringfeed consume --digest`, the Python client's tests/conformance/
python_reader.py, the C client's `read_batches`) and requires identical per-batch lines
(epoch, index, count, sum of ids, FNV-1a 64 of the images bytes), a clean end, and the same
behaviour on the failure rows of docs/failure-modes.md that a client sees.

Scenarios (each client in its own runtime directory, in parallel):

1. end of a finite run: the client starts with the daemon (waiting for it to appear), pauses
   0 s, 0.5 s and 2 s holding each epoch's last batch and again before asking for the next
   epoch; it must print every batch, then `end`, and exit 0; the daemon exits 0 once the
   client detached; a client attaching after that is told the run finished (`end`, exit 0).
2. producer killed: the client reports `producer_gone` and exits 1, within 1 s of the kill.
3. consumer killed holding batches: the next client of the lane gets those batches first,
   flagged `redelivered`, then the rest, and the epoch is complete.
4. lane held: a second client is refused with `lane_held` (retryable) at once.
5. version mismatch: a ring whose header says major 1 is refused as `format`, naming
   `version_major`; an attach request of another major (1, 3) is refused with code `version`.
6. a hostile producer (tests/conformance/fake_producer.py, a 2.0 producer that can lie), each
   case refused with the same code by every client, naming the field, never a crash:
   impossible header values; a slot in state 3 (1.x's HELD) seen at run time; a lane page of
   the wrong size (by the formula, or by the reply's `lane_page_bytes`), with a bad magic,
   the wrong lane or the wrong slot count (`format`); a reply with 0, 1, 2 or 4 descriptors
   instead of ring, lane page, doorbell, and a writable ring descriptor (`protocol`). The same
   producer, honest, serves every client the same batches first: the refusals are the lies'.
7. resume: a client attaching with `resume` at (1, 2) gets that batch and the rest, the same
   bytes as the uninterrupted run.
8. selection (`[selection] mode = "infobatch"`): epoch 1 is decided only once every lane sent
   `EPOCH_DONE 0` (ring format §9), so every client must send it; the batches agree.
9. the C client's memory (clients/c/tests/isolation_check, against the fake producer; the
   Python and Rust clients have their own tests): the ring mapped r--s and only the lane page
   writable, mprotect(PROT_WRITE) of the ring refused, a store into a batch faults, and a
   forked child can neither take nor release the parent's batches through the lane page.
10. the daemon's side of the 2.0 handshake: exactly three descriptors; the ring's is
   read-only (`mmap(PROT_WRITE)` fails with EACCES), the lane page sealed and as the reply
   says, the doorbell an eventfd.

A new client adds one entry to CLIENTS (a command printing the same lines).

Usage: python3 tests/conformance/run.py --bin target/debug/ringfeed --c clients/c/read_batches
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "conformance" / "ring.toml"
FAKE_PRODUCER = ROOT / "tests" / "conformance" / "fake_producer.py"
NAME = "conf"
PAUSES = (0.0, 0.5, 2.0)
DEADLINE_S = 120.0  # any single wait; a hung client fails the test instead of hanging CI
GONE_WITHIN_S = 1.0  # ring-format §6: a consumer notices a dead producer within 1 s
# Process start-up and exit around the measured interval (a Python interpreter's teardown):
# the test accepts this on top of the contract's 1 s.
EXIT_SLACK_S = 0.5

Command = Callable[..., list[str]]


def clients(bin_path: Path, c_reader: Path) -> dict[str, Command]:
    def rust(*flags: str) -> list[str]:
        return [str(bin_path), "consume", NAME, "--digest", *flags]

    def python(*flags: str) -> list[str]:
        return [sys.executable, str(ROOT / "tests/conformance/python_reader.py"), NAME, *flags]

    def c(*flags: str) -> list[str]:
        return [str(c_reader), NAME, *flags]

    return {"rust": rust, "python": python, "c": c}


class Failure(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failure(what)


class Env:
    """A private runtime directory and the processes started in it."""

    def __init__(self, bin_path: Path) -> None:
        self.bin = bin_path
        self.dir = Path(tempfile.mkdtemp(prefix="rfc-", dir="/tmp"))
        os.chmod(self.dir, 0o700)
        self.env = {
            **os.environ,
            "RINGFEED_RUNTIME_DIR": str(self.dir),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "clients/python/src"), os.environ.get("PYTHONPATH", "")]
            ),
        }
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def serve(self, *flags: str) -> subprocess.Popen[str]:
        return self.start([str(self.bin), "serve", "--config", str(CONFIG), *flags])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def finish(proc: subprocess.Popen[str], what: str) -> tuple[int, list[str], str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise Failure(f"{what}: did not finish within {DEADLINE_S} s\n{out}\n{err}") from None
    return proc.returncode, out.splitlines(), err


def read_line(proc: subprocess.Popen[str], what: str) -> str:
    """The next stdout line, awaited with a deadline."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(DEADLINE_S)
    check(
        bool(box) and box[0] != "",
        f"{what}: no line (stderr: {proc.stderr.read() if proc.poll() is not None else '...'})",
    )  # type: ignore[union-attr]
    return box[0].rstrip("\n")


def wait_for_socket(env: Env) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not (env.dir / f"{NAME}.sock").exists():
        check(time.monotonic() < deadline, "the daemon never created its socket")
        time.sleep(0.02)


# ----- 1. the end of a finite run --------------------------------------------------------------


def end_of_run(bin_path: Path, client: Command, *, pause: float, linger: str) -> list[str]:
    env = Env(bin_path)
    try:
        # The README's quick start: daemon and trainer started together; the client waits.
        daemon = env.serve("--exit-when-done", "--linger", linger)
        reader = env.start(client("--wait", "30", "--pause-at-epoch-end", str(pause)))
        rc, lines, err = finish(reader, f"pause {pause}")
        check(rc == 0, f"pause {pause}: exit {rc}, stderr:\n{err}")
        check(
            bool(lines) and lines[-1] == "end", f"pause {pause}: no clean end: {lines[-3:]} {err}"
        )
        drc, _, derr = finish(daemon, "daemon")
        check(drc == 0, f"pause {pause}: daemon exit {drc}:\n{derr}")
        check((env.dir / f"{NAME}.finished").exists(), "no finished marker after the run")
        # A consumer that comes back after the daemon exited is told the run finished.
        again = env.start(client("--wait", "0"))
        rc2, lines2, err2 = finish(again, "re-attach")
        check(rc2 == 0 and lines2 == ["end"], f"re-attach after the end: {rc2} {lines2} {err2}")
        return lines[:-1]
    finally:
        env.close()


# ----- 2. producer killed ----------------------------------------------------------------------


def producer_killed(bin_path: Path, client: Command) -> str:
    env = Env(bin_path)
    try:
        daemon = env.serve("--epochs", "0")
        wait_for_socket(env)
        # No wait: a Python loader told to wait would re-attach to a next producer instead.
        reader = env.start(client("--wait", "0"))
        read_line(reader, "first batch")
        daemon.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc, _, err = finish(reader, "reader after the kill")
        took = time.monotonic() - killed
        check(rc == 1, f"exit {rc} after the producer was killed; stderr:\n{err}")
        code = err.strip().splitlines()[-1].split(":")[0] if err.strip() else ""
        check(took <= GONE_WITHIN_S + EXIT_SLACK_S, f"noticed the kill after {took:.2f} s")
        return code
    finally:
        env.close()


# ----- 3. consumer killed holding batches ------------------------------------------------------


def consumer_killed(bin_path: Path, client: Command) -> tuple[list[str], list[str]]:
    env = Env(bin_path)
    try:
        env.serve("--epochs", "1")
        holder = env.start(client("--wait", "30", "--hold", "2"))
        held = [read_line(holder, "held batch") for _ in range(2)]
        check(read_line(holder, "holding") == "holding", "holder did not report holding")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        reader = env.start(client("--wait", "30"))
        rc, lines, err = finish(reader, "next consumer")
        check(rc == 0 and lines and lines[-1] == "end", f"next consumer: {rc} {lines[-2:]} {err}")
        return held, lines[:-1]
    finally:
        env.close()


# ----- 4. lane held ----------------------------------------------------------------------------


def lane_held(bin_path: Path, client: Command) -> str:
    env = Env(bin_path)
    try:
        env.serve("--epochs", "0")
        holder = env.start(client("--wait", "30", "--hold", "1"))
        read_line(holder, "held batch")
        check(read_line(holder, "holding") == "holding", "holder did not report holding")
        second = env.start(client("--wait", "0"))
        rc, _, err = finish(second, "second consumer")
        check(rc == 1, f"a second consumer of a held lane: exit {rc}")
        return err.strip().splitlines()[-1].split(":")[0]
    finally:
        env.close()


# ----- 5. and 6. a producer that lies ----------------------------------------------------------


def fake_producer(env: Env, *flags: str) -> None:
    writer = env.start([sys.executable, str(FAKE_PRODUCER), "--name", NAME, "--dir",
                        str(env.dir), *flags])  # fmt: skip
    check(read_line(writer, "fake producer").startswith("READY"), "fake producer not ready")


def honest_fake(bin_path: Path, client: Command) -> list[str]:
    """The fake producer telling the truth: every client reads its whole run."""
    env = Env(bin_path)
    try:
        fake_producer(env)
        reader = env.start(client("--wait", "0"))
        rc, lines, err = finish(reader, "reader of the honest fake producer")
        check(rc == 0 and lines[-1:] == ["end"], f"honest fake: {rc} {lines[-2:]} {err}")
        return lines[:-1]
    finally:
        env.close()


def refused(bin_path: Path, client: Command, flags: list[str], code: str, field: str) -> str:
    """A client of a fake producer run with `flags`: exit 1, `error CODE`, naming `field`."""
    env = Env(bin_path)
    try:
        fake_producer(env, *flags)
        reader = env.start(client("--wait", "0"))
        rc, _, err = finish(reader, f"reader of a producer with {flags}")
        last = err.strip().splitlines()[-1] if err.strip() else ""
        check(
            rc == 1 and last.startswith(f"error {code}:") and field in last,
            f"{flags}: exit {rc}, {last!r} (want error {code} naming {field!r})",
        )
        return last.split(":")[0]
    finally:
        env.close()


def version_mismatch(bin_path: Path, client: Command) -> str:
    return refused(bin_path, client, ["--version-major", "1", "--no-produce"], "format",
                   "version_major")  # fmt: skip


# (fake producer flags, the code, the field the error must name). Ring pokes are
# "FMT:OFFSET:VALUE" at ring format §5 offsets: the fake producer's tensor table starts at 512
# (tensor 0 = images), its lane table at 704, its slot table at 832 (slot 0); lane page pokes
# at §5 "Lane page" offsets.
HOSTILE = (
    (["--poke", "8s:0:RINGFEEX"], "format", "magic"),
    (["--poke", "I:88:17"], "format", "tensor_count"),
    (["--poke", "Q:72:4097"], "format", "slot_stride"),
    (["--poke", "I:96:514"], "format", "lane"),  # lane_table_offset not a multiple of 8
    (["--poke", "B:512:1"], "format", "name"),  # a control byte in a tensor name
    (["--poke", f"I:{512 + 16}:99"], "format", "dtype"),
    (["--poke", f"I:{512 + 20}:5"], "format", "rank"),
    (["--poke", "I:156:2", "--poke", f"I:{704 + 104}:5"], "format", "world_size"),
    # 1.x's HELD, written once the client attached: refused when the client scans the slot.
    (["--poke-after-attach", "I:832:3"], "format", "state"),
    # The lane page: its size against the formula (4 slots: 4096), against the reply, its
    # magic, lane and slot count, each named as ring format §4 step 5 names it.
    (["--lane-page-bytes", "8192"], "format", "lane_page_bytes"),
    (["--reply-lane-page-bytes", "8192"], "format", "lane_page_bytes"),
    (["--lane-poke", "8s:0:RFLANEXX"], "format", "lane_page.magic"),
    (["--lane-poke", "I:8:1"], "format", "lane_page.lane"),
    (["--lane-poke", "I:12:5"], "format", "lane_page.slots"),
    # The descriptors: exactly ring, lane page, doorbell, and a read-only ring.
    (["--fds", "0"], "protocol", "descriptor"),
    (["--fds", "1"], "protocol", "descriptor"),
    (["--fds", "2"], "protocol", "descriptor"),
    (["--fds", "4"], "protocol", "descriptor"),
    (["--writable-ring"], "protocol", "writable"),
)


def hostile_producer(bin_path: Path, client: Command) -> list[str]:
    return [refused(bin_path, client, flags, code, field) for flags, code, field in HOSTILE]


def c_isolation_check(bin_path: Path, isolation_check: Path) -> None:
    env = Env(bin_path)
    try:
        fake_producer(env)
        rc, lines, err = finish(env.start([str(isolation_check), NAME]), "isolation_check")
        check(rc == 0 and lines == ["ok"], f"isolation_check: exit {rc}, {lines} {err}")
    finally:
        env.close()


def resume(bin_path: Path, client: Command) -> list[str]:
    env = Env(bin_path)
    try:
        env.serve("--exit-when-done")
        reader = env.start(client("--wait", "30", "--resume", "1:2"))
        rc, lines, err = finish(reader, "resumed reader")
        check(rc == 0 and lines and lines[-1] == "end", f"resume: {rc} {lines[-2:]} {err}")
        return lines[:-1]
    finally:
        env.close()


def selection(bin_path: Path, client: Command) -> list[str]:
    env = Env(bin_path)
    try:
        config = env.dir.parent / f"{env.dir.name}-selection.toml"
        config.write_text(CONFIG.read_text() + '\n[selection]\nmode = "infobatch"\n')
        try:
            env.start([
                str(bin_path), "serve", "--config", str(config), "--state-dir",
                str(env.dir / "state"), "--exit-when-done",
            ])  # fmt: skip
            reader = env.start(client("--wait", "30"))
            rc, lines, err = finish(reader, "reader of a selecting ring")
            check(rc == 0 and lines and lines[-1] == "end", f"selection: {rc} {lines[-2:]} {err}")
            epochs = {line.split()[1] for line in lines[:-1]}
            check(epochs == {"0", "1"}, f"selection: epochs {epochs}")
            return lines[:-1]
        finally:
            config.unlink(missing_ok=True)
    finally:
        env.close()


def attach_raw(env: Env, version: int) -> tuple[dict[str, object], list[int]]:
    """One attach request on a plain socket: the reply and the descriptors it carried."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE_S)
        s.connect(str(env.dir / f"{NAME}.sock"))
        s.sendall(b'{"op":"attach","version":%d,"lane":0,"pid":%d}\n' % (version, os.getpid()))
        data, fds, _flags, _addr = socket.recv_fds(s, 4096, 8)
        while not data.endswith(b"\n"):
            more = s.recv(4096)
            check(bool(more), f"reply to a version {version} attach: no whole line")
            data += more
        return json.loads(data), fds


def daemon_refuses_another_major(bin_path: Path) -> None:
    env = Env(bin_path)
    try:
        env.serve("--epochs", "1")
        wait_for_socket(env)
        for version in (1, 3):
            reply, fds = attach_raw(env, version)
            for fd in fds:
                os.close(fd)
            check(reply.get("ok") is False and reply.get("code") == "version"
                  and reply.get("retry") is False and not fds,
                  f"reply to a version {version} attach: {reply}, {len(fds)} fds")  # fmt: skip
    finally:
        env.close()


def daemon_passes_read_only_ring(bin_path: Path) -> None:
    """The daemon's half of the 2.0 handshake, checked on the descriptors themselves."""
    env = Env(bin_path)
    try:
        env.serve("--epochs", "1")
        wait_for_socket(env)
        reply, fds = attach_raw(env, 2)
        try:
            check(reply.get("ok") is True, f"attach: {reply}")
            check(len(fds) == 3, f"the reply carried {len(fds)} descriptors, not 3")
            check(reply.get("fds") == ["ring", "lane", "doorbell"], f"fds: {reply.get('fds')}")
            ring, lane, doorbell = fds
            check(fcntl.fcntl(ring, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY,
                  "the ring descriptor is not O_RDONLY")  # fmt: skip
            size = os.fstat(ring).st_size
            try:
                mmap.mmap(ring, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                raise Failure("a consumer mapped the ring PROT_WRITE")
            except PermissionError as err:
                check(err.errno == errno.EACCES, f"mmap(PROT_WRITE) of the ring: {err}")
            page_bytes = reply.get("lane_page_bytes")
            check(os.fstat(lane).st_size == page_bytes, f"lane page size != {page_bytes}")
            seals = fcntl.fcntl(lane, fcntl.F_GET_SEALS)
            want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            check(seals & want == want, f"lane page seals {seals:#x}")
            check(os.pread(lane, 16, 0) == b"RFLANE\0\0" + bytes(4) + (3).to_bytes(4, "little"),
                  "lane page magic / lane 0 / slots 3")  # fmt: skip
            check(os.readlink(f"/proc/self/fd/{doorbell}") == "anon_inode:[eventfd]",
                  "the doorbell is not an eventfd")  # fmt: skip
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        env.close()


# ----- the driver --------------------------------------------------------------------------------


def run_each(cmds: dict[str, Command], job: Callable[[Command], object]) -> dict[str, object]:
    with ThreadPoolExecutor(len(cmds)) as pool:
        futures = {name: pool.submit(job, cmd) for name, cmd in cmds.items()}
        results: dict[str, object] = {}
        errors = []
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Failure as err:
                errors.append(f"{name}: {err}")
        if errors:
            raise Failure("\n".join(errors))
        return results


def same(results: dict[str, object], what: str) -> object:
    values = list(results.values())
    if any(v != values[0] for v in values):
        detail = "\n".join(f"  {k}: {v}" for k, v in results.items())
        raise Failure(f"{what} differs between clients:\n{detail}")
    return values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, default=ROOT / "target/debug/ringfeed")
    parser.add_argument("--c", type=Path, default=ROOT / "clients/c/read_batches")
    parser.add_argument("--only", help="comma-separated client names")
    args = parser.parse_args()
    for tool in (args.bin, args.c, args.c.parent / "tests" / "isolation_check"):
        if not os.access(tool, os.X_OK):
            print(f"FAIL {tool} is missing: build it first (cargo build; make -C clients/c)")
            return 1
    cmds = clients(args.bin.resolve(), args.c.resolve())
    if args.only:
        cmds = {k: v for k, v in cmds.items() if k in args.only.split(",")}
    try:
        reference: Optional[object] = None
        # The default linger, and none: a daemon that exits the moment the last batch is
        # released, while its consumer is still attached and pausing (the ring stays FINISHED).
        for linger in ("10", "0"):
            for pause in PAUSES:
                what = f"end of run, pause {pause} s, --linger {linger}"
                job = functools.partial(end_of_run, args.bin, pause=pause, linger=linger)
                lines = same(run_each(cmds, job), what)
                check(reference is None or lines == reference, f"{what} changed the batches")
                reference = lines
                print(f"ok   {what}: {len(lines)} identical batches")  # type: ignore[arg-type]
        batches = reference
        assert isinstance(batches, list)
        epochs = {line.split()[1] for line in batches}
        check(epochs == {"0", "1"}, f"expected epochs 0 and 1, got {epochs}")

        code = same(run_each(cmds, lambda c: producer_killed(args.bin, c)), "producer killed")
        check(code == "error producer_gone", f"producer killed: {code}")
        print(f"ok   producer killed: every client says producer_gone within {GONE_WITHIN_S} s")

        outcome = run_each(cmds, lambda c: consumer_killed(args.bin, c))
        for name, (held, lines) in outcome.items():  # type: ignore[misc]
            first = [line.removesuffix(" redelivered") for line in lines[:2]]
            check(first == held and all(x.endswith(" redelivered") for x in lines[:2]),
                  f"{name}: first batches after the kill {lines[:2]} != held {held}")  # fmt: skip
            rest = [line.removesuffix(" redelivered") for line in lines]
            epoch0 = [line for line in batches if line.startswith("epoch 0 ")]
            check(sorted(rest) == sorted(epoch0), f"{name}: epoch after the kill is not complete")
        same({k: v for k, v in outcome.items()}, "consumer killed holding batches")
        print("ok   consumer killed holding 2 batches: redelivered first, epoch complete")

        code = same(run_each(cmds, lambda c: lane_held(args.bin, c)), "lane held")
        check(code == "error lane_held", f"lane held: {code}")
        print("ok   lane held: every client is refused with lane_held")

        code = same(run_each(cmds, lambda c: version_mismatch(args.bin, c)), "version mismatch")
        check(code == "error format", f"version mismatch: {code}")
        daemon_refuses_another_major(args.bin)
        print("ok   version mismatch: a major-1 ring is a format error; the daemon says 'version'")

        lines = same(run_each(cmds, lambda c: honest_fake(args.bin, c)), "honest fake producer")
        print(f"ok   the fake producer, honest: {len(lines)} identical batches")  # type: ignore[arg-type]
        same(run_each(cmds, lambda c: hostile_producer(args.bin, c)), "hostile producers")
        print(f"ok   {len(HOSTILE)} hostile producers: every client refuses each, naming the field")

        if "c" in cmds:
            c_isolation_check(args.bin, args.c.resolve().parent / "tests" / "isolation_check")
            print("ok   c: the ring is read-only to the client; a forked child cannot release")

        daemon_passes_read_only_ring(args.bin)
        print("ok   the daemon passes ring (read-only), lane page, doorbell")

        lines = same(run_each(cmds, lambda c: resume(args.bin, c)), "resume")
        tail = batches[
            batches.index(next(x for x in batches if x.startswith("epoch 1 index 2 "))) :
        ]
        check(lines == tail, f"resumed at 1:2: {lines} != {tail}")
        print(f"ok   resume at epoch 1 index 2: the same {len(tail)} batches as the whole run")

        lines = same(run_each(cmds, lambda c: selection(args.bin, c)), "selection")
        print(
            f"ok   selection: every client ends epoch 0, epoch 1 is decided ({len(lines)} batches)"
        )  # type: ignore[arg-type]
    except Failure as err:
        print(f"FAIL {err}", file=sys.stderr)
        return 1
    print(f"conformance: {', '.join(cmds)} agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
