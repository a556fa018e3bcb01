"""Exceptions and warnings raised by the ringfeed client.

Every error derives from :class:`RingfeedError`, so ``except ringfeed.RingfeedError`` catches
all of them; the subclasses say what went wrong.
"""

from __future__ import annotations


class RingfeedError(Exception):
    """Base class of every error raised by the ringfeed client."""


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
    ``client`` for a bad argument).
    ``retryable`` says whether the same attach may succeed later (``not_running``,
    ``lane_held``, ``stopping``, ``request_timeout``).
    """

    def __init__(self, message: str, *, code: str = "client", retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


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
    """The producer died, stopped, failed or froze while this consumer was attached."""


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
