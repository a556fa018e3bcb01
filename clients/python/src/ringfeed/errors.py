"""Exceptions and warnings raised by the ringfeed client.

Every error derives from :class:`RingfeedError`, so ``except ringfeed.RingfeedError`` catches
all of them; the subclasses say what went wrong.
"""

from __future__ import annotations

from typing import Any, Literal

#: Why a :class:`ProducerGone` was raised.
GoneReason = Literal["stopped", "failed", "died", "frozen"]


class RingfeedError(Exception):
    """Base class of every error raised by the ringfeed client."""


class ArgumentError(RingfeedError, ValueError):
    """An argument (or the environment variable standing in for one) is out of range or
    malformed: a ``max_held`` below 1, a resume counter out of range, a sample id outside the
    dataset. Also a :class:`ValueError`, so ``except ValueError`` catches it as it would
    for any Python API."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument has the wrong type or does not fit the other arguments (a resume state that
    is not a dict, float sample ids, ``normalize=True`` without ``device=``). Also a
    :class:`TypeError` (and an :class:`ArgumentError`)."""


class FormatError(RingfeedError):
    """The ring's memory does not follow the ring format; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"malformed ring: {field}: {message}")
        self.field = field


class AttachError(RingfeedError):
    """Connecting or attaching to a producer failed; the message carries the producer's reason.

    ``code`` is machine-readable (ring format §3 "Refusal codes"): the producer's refusal code
    (``lane_held``, ``version``, ``lane_range``, ``permission``, ...), or the client's own
    (``not_running``: no daemon serves the name yet; ``finished``: the run ended and its
    producer exited; ``runtime_dir``, ``connect``, ``foreign_producer``, ``protocol``,
    ``client`` for a bad argument: an :class:`AttachArgumentError`, also a ``ValueError``).
    ``retryable`` says whether the same attach may succeed later (``not_running``,
    ``lane_held``, ``stopping``, ``request_timeout``).
    """

    def __init__(self, message: str, *, code: str = "client", retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class AttachArgumentError(AttachError, ArgumentError):
    """A bad argument to attach (the ring name, the lane): an :class:`AttachError` with code
    ``client`` that is also an :class:`ArgumentError`, hence a :class:`ValueError`."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="client")


class DaemonNotRunning(AttachError):
    """No daemon listens on the ring's socket (yet): the socket or the runtime directory is
    missing, or the connection was refused. A :class:`Loader` waits for this one (30 s by
    default, ``wait_for_producer``); other refusals are raised at once. Code ``not_running``,
    retryable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="not_running", retryable=True)


class ResumeMismatch(AttachError):
    """The producer refused a resume state saved for another sample order (1.3): ``fields``
    lists ``(field, saved, serving)`` for every difference (seed, dataset, shuffle, selection,
    …; a changed world size or batch size is remapped, not refused). Retrying cannot help; the
    message says what to change."""

    def __init__(self, message: str, fields: list[tuple[str, str, str]]) -> None:
        super().__init__(message, code="resume_mismatch")
        self.fields = fields


class RankMismatch(AttachError):
    """The lane serves another global rank or world size than this trainer is (``RANK`` /
    ``WORLD_SIZE``); the message says how to start the daemon instead. Code
    ``rank_mismatch``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="rank_mismatch")


class ProducerGone(RingfeedError):
    """The producer died, stopped, failed or froze while this consumer was attached.

    ``reason`` says which, machine-readably: ``stopped`` (it shut down: SIGTERM, Ctrl-C),
    ``failed`` (it stopped on an error; the message carries the ring's ``last_error``),
    ``died`` (its end of the connection closed: exited or killed) or ``frozen`` (its heartbeat
    is older than 3 s: SIGSTOP, a hung host). ``pid`` is the producer's pid as the ring's
    header records it (in the producer's pid namespace; 0 when unknown).
    """

    def __init__(self, message: str, *, reason: GoneReason, pid: int) -> None:
        super().__init__(message)
        self.reason: GoneReason = reason
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its attributes (a DataLoader worker or a multiprocessing pool may
        # hand the error to another process).
        return (_producer_gone, (str(self), self.reason, self.pid))


class ReleasedBatchError(RingfeedError):
    """A batch's tensors were accessed after the batch was released."""


class RingTimeout(RingfeedError):
    """No batch arrived within the loader's ``timeout``."""


class StreamFinished(RingfeedError, StopIteration):
    """The producer has served its last epoch and this lane has nothing left: raised by
    iteration (a ``for`` loop ends on it, since it is a ``StopIteration``) with the reason in
    its message, which the loader also logs once, so an exhausted ring never passes for an
    empty epoch. Catch it with ``next(it)`` or ``except ringfeed.StreamFinished``."""


class RingfeedWarning(UserWarning):
    """Something degraded but the client carries on (for example ``pin=True`` without CUDA)."""


def _producer_gone(message: str, reason: GoneReason, pid: int) -> ProducerGone:
    """Unpickles a :class:`ProducerGone` (keyword-only arguments need a helper)."""
    return ProducerGone(message, reason=reason, pid=pid)
