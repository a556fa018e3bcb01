"""Shared futex wait/wake on 32-bit words of the ring, through libc's ``syscall`` (§6)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_SYSCALL_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
FUTEX_WAIT = 0  # shared (no FUTEX_PRIVATE_FLAG): the word lives in memory shared across processes
FUTEX_WAKE = 1
_INT_MAX = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# Only integer/pointer arguments are passed, so fixed argtypes are safe for this variadic call
# and spare a conversion object per argument on the release path.
_syscall.argtypes = (
    ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
)  # fmt: skip
_NR_FUTEX = _SYSCALL_FUTEX.get(platform.machine().lower())


def _nr() -> int:
    if _NR_FUTEX is None:
        raise OSError(errno.ENOSYS, f"futex syscall number unknown on {platform.machine()}")
    return _NR_FUTEX


def futex_wait(address: int, expected: int, timeout_s: float) -> None:
    """Sleep while the u32 at ``address`` equals ``expected``, at most ``timeout_s`` seconds.

    Returns on a wake-up, a timeout, a changed value or a signal; callers re-read state anyway.
    The GIL is released while sleeping (ctypes ``CDLL``), and a pending Ctrl-C is raised by the
    interpreter as soon as the call returns.
    """
    seconds = int(timeout_s)
    timeout = _Timespec(seconds, int((timeout_s - seconds) * 1e9))
    result = _syscall(_nr(), address, FUTEX_WAIT, expected, ctypes.addressof(timeout), None, 0)
    if result == -1:
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
            raise OSError(err, os.strerror(err))


def futex_wake(address: int) -> None:
    """Wake every waiter on the u32 at ``address``."""
    _syscall(_nr(), address, FUTEX_WAKE, _INT_MAX, None, None, 0)
