"""Shared fixtures: a private runtime directory and in-process reference producers."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ring_writer import RingWriter


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
