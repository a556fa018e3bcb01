"""Shared fixtures: a private runtime directory, in-process reference producers and child
processes that are always reaped. (pytest puts this directory on sys.path.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ring_writer import RingWriter

HERE = Path(__file__).parent
MakeWriter = Callable[..., RingWriter]
Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    # Short path: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_writer(runtime_dir: Path) -> Iterator[Callable[..., RingWriter]]:
    writers: list[RingWriter] = []

    def make(name: str = "t", **options: Any) -> RingWriter:
        writer = RingWriter(name, runtime_dir, **options)
        writer.serve()
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.stop()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    processes: list[subprocess.Popen[str]] = []

    def start(script: str, *args: object, stdin: int | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        process = subprocess.Popen(
            [sys.executable, str(HERE / script), *map(str, args)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
        if process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # a child that exited unread
                process.stdin.close()
