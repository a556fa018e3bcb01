"""Helpers shared by the test modules: awaiting conditions with a deadline, reading child
process reports, spotting a thread blocked in FUTEX_WAIT."""

from __future__ import annotations

import json
import selectors
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def in_futex_syscall(thread_id: int) -> bool:
    """Whether a thread of this process is blocked in the futex syscall (x86-64 202, arm64 98)."""
    syscall = Path(f"/proc/self/task/{thread_id}/syscall").read_text().split()
    return bool(syscall) and syscall[0] in ("202", "98")


def in_futex_syscall_of(pid: int) -> bool:
    """Whether process ``pid``'s main thread is blocked in the futex syscall."""
    syscall = Path(f"/proc/{pid}/syscall").read_text().split()
    return bool(syscall) and syscall[0] in ("202", "98")


def read_line(process: subprocess.Popen[str], timeout_s: float = 20.0) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise AssertionError(f"no output from pid {process.pid} within {timeout_s} s")
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"pid {process.pid} exited with {process.wait()} without output")
    return line


def read_report(process: subprocess.Popen[str]) -> Any:
    return json.loads(read_line(process))
