"""Start the daemon from the training script: :func:`serve` runs ``ringfeed serve`` as a child
process, waits until it answers, and hands back a :class:`Daemon` to make loaders from.

Brief overview: under torchrun (``LOCAL_RANK`` set) only local rank 0 starts the daemon, with
one lane per local rank (``--lanes $LOCAL_WORLD_SIZE``); every other rank waits until it
answers and reads its own lane. The ring's name is derived from the job's torchrun variables, so
all local ranks agree on it without talking. The daemon is started with ``--parent-pid``: it
stops by itself once the process that started it has exited, however that process ended
(SIGKILL included), so it never outlives the job.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional, Union

from .errors import ArgumentError, AttachError, RingfeedError
from .loader import Loader
from .protocol import info
from .runtime import check_name, socket_path

PathLike = Union[str, "os.PathLike[str]"]

#: Lines of the daemon's output kept to explain a failed start.
_TAIL_LINES = 20


def _binary() -> str:
    """The daemon: ``$RINGFEED_BIN``, else the one pip installed beside this Python, else PATH."""
    explicit = os.environ.get("RINGFEED_BIN", "")
    if explicit:
        return explicit
    beside = Path(sysconfig.get_path("scripts")) / "ringfeed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ringfeed")
    if found:
        return found
    raise RingfeedError(
        "the ringfeed daemon was not found: `pip install ringfeed` installs it beside this"
        f" Python ({beside}); or set RINGFEED_BIN to the binary"
    )


def _default_name() -> str:
    """A ring name every local rank of one torchrun job derives alike; else one per process."""
    if "LOCAL_RANK" in os.environ:
        job = "|".join(
            os.environ.get(key, "")
            for key in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
        )
        return "job-" + hashlib.sha256(job.encode()).hexdigest()[:16]
    return f"job-{os.getpid()}"


def _ring_name(config: PathLike) -> str:
    """The ``[ring] name`` of a configuration file (``"default"`` when it sets none)."""
    try:
        import tomllib as toml  # type: ignore[import-not-found,unused-ignore]  # Python 3.11+
    except ImportError:  # pragma: no cover - older Pythons
        try:
            import tomli as toml  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ImportError:
            raise RingfeedError(
                "serve() with several configurations reads their [ring] names, which needs"
                " Python 3.11+ (tomllib) or the tomli package; or start `ringfeed serve"
                " --config a.toml --config b.toml` yourself and attach with Loader(name)"
            ) from None
    try:
        with open(config, "rb") as f:
            ring = toml.load(f).get("ring", {})
    except (OSError, ValueError) as err:
        raise RingfeedError(f"cannot read the [ring] name of {os.fspath(config)}: {err}") from None
    name = ring.get("name", "default") if isinstance(ring, dict) else "default"
    return check_name(str(name))


def _flags(overrides: dict[str, Any]) -> list[str]:
    """``batch_size=64`` → ``--batch-size 64``; ``True`` → the bare flag; lists → each value."""
    flags: list[str] = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *(_text(v) for v in value)]
        else:
            flags += [flag, _text(value)]
    return flags


def _text(value: Any) -> str:
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


class Daemon:
    """A daemon serving ring :attr:`name`: started by this process (local rank 0), or by local
    rank 0 of the same torchrun job. A context manager; leaving it calls :meth:`stop`."""

    def __init__(
        self,
        name: str,
        pid: int,
        process: Optional[subprocess.Popen[bytes]],
        runtime_dir: Optional[PathLike],
        tee: Optional[_Tee] = None,
        names: Optional[list[str]] = None,
    ) -> None:
        self.name = name
        """The ring's name (what :class:`Loader` attaches to); the first ring's when the
        daemon serves several."""
        self.names = names if names is not None else [name]
        """Every ring the daemon serves (one per configuration file given to :func:`serve`)."""
        self.pid = pid
        """The daemon's process id."""
        self._process = process
        self._runtime_dir = runtime_dir
        self._tee = tee

    @property
    def owned(self) -> bool:
        """True in the process that started the daemon (the one :meth:`stop` stops)."""
        return self._process is not None

    def loader(self, ring: Optional[str] = None, **kwargs: Any) -> Loader:
        """A :class:`Loader` on ring ``ring`` (default: :attr:`name`, the first ring); lane
        ``$LOCAL_RANK`` (else 0) unless ``lane=`` is given. Keyword arguments are the
        Loader's."""
        if ring is not None and ring not in self.names:
            raise ArgumentError(f"this daemon serves rings {self.names}, not {ring!r}")
        kwargs.setdefault("runtime_dir", self._runtime_dir)
        kwargs.setdefault("wait_for_producer", 60.0)
        return Loader(self.name if ring is None else ring, **kwargs)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the daemon (SIGTERM; SIGKILL after ``timeout`` seconds) and wait for it. Only
        the starting process stops it; elsewhere this does nothing. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._tee is not None:
            self._tee.join(timeout)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        role = "started here" if self.owned else "started by local rank 0"
        return f"<ringfeed.Daemon {self.name!r} pid {self.pid}, {role}>"


class _Tee:
    """Copies the daemon's output to our stderr, keeping the last lines. Until the daemon
    serves (or :data:`_HOLD_S` passed) lines are held back: a daemon that fails at once is
    reported by the exception alone, whose message carries its words, not printed twice."""

    def __init__(self, stream: IO[bytes], tail: collections.deque[str]) -> None:
        self._tail = tail
        self._lock = threading.Lock()
        self._held: Optional[list[str]] = []  # None once released
        self._release_at = time.monotonic() + _HOLD_S
        self.thread = threading.Thread(
            target=self._pump, args=(stream,), name="ringfeed-daemon-output", daemon=True
        )
        self.thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                self._tail.append(line.rstrip("\n"))
                with self._lock:
                    if self._held is not None and time.monotonic() < self._release_at:
                        self._held.append(line)
                        continue
                self.release()
                sys.stderr.write(line)
                sys.stderr.flush()

    def release(self) -> None:
        """Echo what was held back, and everything from now on."""
        with self._lock:
            held, self._held = self._held, None
        if held:
            sys.stderr.write("".join(held))
            sys.stderr.flush()

    def release_if_due(self) -> None:
        """Release once the hold time has passed (a daemon indexing for minutes shows its
        progress even when it prints nothing new)."""
        if time.monotonic() >= self._release_at:
            self.release()

    def echoed(self) -> bool:
        """Whether any output has been (or will be) echoed already."""
        with self._lock:
            return self._held is None

    def join(self, timeout: float) -> None:
        """Wait for the daemon's last output."""
        self.thread.join(timeout)


_HOLD_S = 2.0


def _wait_until_serving(
    name: str,
    runtime_dir: Optional[PathLike],
    deadline: float,
    process: Optional[subprocess.Popen[bytes]] = None,
    tail: Optional[collections.deque[str]] = None,
    tee: Optional[_Tee] = None,
) -> int:
    """Polls the ring's socket until its producer answers; returns the producer's pid. With
    ``process``, only that process counts and its early exit is an error naming why."""
    last: Optional[Exception] = None
    while True:
        if process is not None and process.poll() is not None:
            if tee is not None:
                tee.join(5.0)  # its last words may still be in the pipe
            said = "\n".join(tail or ()) or "(no output)"
            if tee is not None and tee.echoed():
                said = f"(its output is above; last line) {(tail or [''])[-1]}"
            raise RingfeedError(
                f"ringfeed serve exited with status {process.returncode} before serving"
                f" ring {name!r}:\n{said}"
            )
        try:
            reply = info(socket_path(name, runtime_dir))
            pid = int(reply.get("producer_pid", 0))
            if process is None or pid == process.pid:
                if tee is not None:
                    tee.release()
                return pid
        except AttachError as err:
            last = err
        if tee is not None:
            tee.release_if_due()
        if time.monotonic() >= deadline:
            raise AttachError(f"ring {name!r} was not served in time; last: {last}")
        time.sleep(0.05)


def serve(
    config: Optional[Union[PathLike, list[PathLike]]] = None,
    name: Optional[str] = None,
    shards: Optional[Union[PathLike, list[PathLike]]] = None,
    epochs: Optional[int] = None,
    *,
    runtime_dir: Optional[PathLike] = None,
    start_timeout: float = 600.0,
    **overrides: Any,
) -> Daemon:
    """Start ``ringfeed serve`` for this job and wait until it serves.

    Args:
        config: TOML configuration (default: the bundled sample dataset), or a list of them:
            one daemon then serves one ring per file (e.g. training and on-demand validation)
            from one worker pool; the rings keep their ``[ring] name``, ``name``, ``shards``
            and ``epochs`` must be left out, and :meth:`Daemon.loader` takes ``ring=``.
        name: ring name; default: one derived from the torchrun job (every local rank derives
            the same), else ``job-<pid>``.
        shards: tar shard paths, globs or brace ranges (replaces ``[source] shards``).
        epochs: epochs to serve (default: the configuration's; 0 = until stopped).
        runtime_dir: the runtime directory (default: ``$RINGFEED_RUNTIME_DIR``, …).
        start_timeout: seconds to wait for the daemon to serve (indexing a large dataset the
            first time takes a while).
        overrides: any other ``ringfeed serve`` flag, ``batch_size=64`` for ``--batch-size
            64``; ``True`` passes a bare flag.

    Under torchrun (``LOCAL_RANK`` set), local rank 0 starts the daemon with ``--lanes
    $LOCAL_WORLD_SIZE``; the other local ranks start nothing, wait until it serves and get a
    :class:`Daemon` whose :meth:`Daemon.loader` reads their own lane.
    """
    configs: list[PathLike] = (
        list(config) if isinstance(config, (list, tuple)) else [] if config is None else [config]
    )
    several = len(configs) > 1
    if several:
        given = [k for k, v in (("name", name), ("shards", shards), ("epochs", epochs)) if v]
        if given:
            raise ArgumentError(
                f"serve() with several configurations takes no {', '.join(given)}: set them in"
                " each file (each ring keeps its [ring] name)"
            )
        names = [_ring_name(c) for c in configs]
    else:
        names = [check_name(name if name is not None else _default_name())]
    name = names[0]
    deadline = time.monotonic() + start_timeout
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and int(local_rank) != 0:
        pid = 0
        for each in names:
            pid = _wait_until_serving(each, runtime_dir, deadline)
        return Daemon(name, pid, None, runtime_dir, names=names)

    args = [_binary(), "serve", "--parent-pid", str(os.getpid())]
    if not several:
        args += ["--name", name]
    for path in configs:
        args += ["--config", os.fspath(path)]
    if shards is not None:
        listed = [shards] if isinstance(shards, (str, os.PathLike)) else shards
        args += ["--shards", *(_text(s) for s in listed)]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    if local_rank is not None and "lanes" not in overrides:
        args += ["--lanes", os.environ.get("LOCAL_WORLD_SIZE", "1")]
    args += _flags(overrides)
    env = dict(os.environ)
    if runtime_dir is not None:
        env["RINGFEED_RUNTIME_DIR"] = os.fspath(runtime_dir)
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    assert process.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    tee = _Tee(process.stdout, tail)
    try:
        for each in names:
            _wait_until_serving(each, runtime_dir, deadline, process, tail, tee)
    except BaseException:
        Daemon(name, process.pid, process, runtime_dir, tee).stop()
        raise
    return Daemon(name, process.pid, process, runtime_dir, tee, names=names)
