"""Holding back Python signal handlers across a critical section of the slot protocol.

A Python signal handler (``KeyboardInterrupt`` from Ctrl-C or Jupyter's interrupt, a SIGTERM
handler that raises) runs between any two bytecodes of the main thread. Taking or releasing a
slot changes the shared slot state *and* the loader's bookkeeping; an exception between the
two would leave a slot that nobody tracks. :func:`hold` swaps the Python-level handlers of the
signals that trainers handle for one that only records the signal; :func:`resume` puts the
handlers back and then runs each recorded signal's own handler, once the section is complete.

Only the main thread runs Python signal handlers, so other threads need nothing held. A signal
outside :data:`HELD_SIGNALS` with a raising Python handler is still covered by the loader's
reconciliation (see ``Loader._reconcile``), which finds and repairs a half-done take or
release at the next take.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable, Optional

_Handler = Callable[[int, Optional[FrameType]], Any]

# The C functions behind `signal.signal` / `signal.getsignal`, without their enum wrapping:
# about ten times faster, which matters twice per batch.
_c_signal = getattr(signal, "_signal", signal)
_signal_set: Callable[[int, Any], Any] = _c_signal.signal
_signal_get: Callable[[int], Any] = _c_signal.getsignal

# Signals whose Python handlers are held back: checking each costs ~0.15 µs, swapping one
# that has a Python handler ~0.7 µs, so the set is the ones trainers and notebooks handle.
HELD_SIGNALS: tuple[int, ...] = tuple(
    int(getattr(signal, name))
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)


class _Recorder:
    """The stand-in handler: remembers which signals arrived, in order."""

    __slots__ = ("arrived",)

    def __init__(self) -> None:
        self.arrived: list[tuple[int, Optional[FrameType]]] = []

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        self.arrived.append((signum, frame))


class Held:
    """What :func:`hold` swapped: the original handlers and the recorder standing in."""

    __slots__ = ("originals", "recorder")

    def __init__(self) -> None:
        self.recorder = _Recorder()
        self.originals: list[tuple[int, _Handler]] = []

    @property
    def pending(self) -> bool:
        """Whether a held-back signal arrived during the section."""
        return bool(self.recorder.arrived)


def hold() -> Optional[Held]:
    """Hold back the Python handlers of :data:`HELD_SIGNALS` in the main thread; None in any
    other thread (where Python handlers never run) or when none of them has a Python handler.
    Pair every call with :func:`resume` in a ``finally``."""
    if threading.current_thread() is not threading.main_thread():
        return None
    held: Optional[Held] = None
    try:
        for signum in HELD_SIGNALS:
            handler = _signal_get(signum)
            if callable(handler):
                if held is None:
                    held = Held()
                _signal_set(signum, held.recorder)
                held.originals.append((signum, handler))
    except BaseException:
        # A signal that arrived while we swapped: put back what was swapped, then let it out.
        resume(held)
        raise
    return held


def resume(held: Optional[Held]) -> None:
    """Put back the handlers :func:`hold` swapped, then run the handler of every signal that
    arrived meanwhile (which may raise, e.g. ``KeyboardInterrupt``)."""
    if held is None:
        return
    originals, arrived = held.originals, held.recorder.arrived
    held.originals, held.recorder.arrived = [], []  # a second resume does nothing
    _restore(originals, 0)
    handlers = dict(originals)
    for signum, frame in arrived:
        handler = handlers.get(signum)
        if callable(handler):
            handler(signum, frame)


def _restore(originals: list[tuple[int, _Handler]], start: int) -> None:
    # A restored handler may fire (and raise) before the next one is restored: each restore
    # sits in the `finally` of the one before, so an exception never skips the rest.
    if start < len(originals):
        signum, handler = originals[start]
        try:
            _signal_set(signum, handler)
        finally:
            _restore(originals, start + 1)
