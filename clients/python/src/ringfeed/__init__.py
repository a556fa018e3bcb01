"""ringfeed: zero-copy batches from the ringfeed daemon's shared-memory ring.

Brief overview: :func:`serve` starts the daemon from the training script and returns a
:class:`Daemon` to make loaders from; :class:`Loader` attaches to one lane of a running
``ringfeed serve`` and yields :class:`Batch` objects whose tensors are read-only numpy arrays
(or torch tensors) viewing the ring; :class:`Ring` is the low-level, validated mapping of a ring
file, written from ``docs/ring-format.md``. Every error derives from :class:`RingfeedError`;
argument mistakes raise :class:`ArgumentError` (also a ``ValueError``) or
:class:`ArgumentTypeError` (also a ``TypeError``).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .batch import Batch
from .daemon import Daemon, serve
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    AttachError,
    DaemonNotRunning,
    FormatError,
    ProducerGone,
    RankMismatch,
    ReleasedBatchError,
    ResumeMismatch,
    RingfeedError,
    RingfeedWarning,
    RingTimeout,
    StreamFinished,
)
from .layout import RingLayout, TensorSpec
from .loader import Loader, evaluation
from .protocol import info
from .ring import Ring
from .runtime import runtime_dir
from .stats import LoaderStats

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AttachError",
    "Batch",
    "Daemon",
    "DaemonNotRunning",
    "FormatError",
    "Loader",
    "LoaderStats",
    "ProducerGone",
    "RankMismatch",
    "ReleasedBatchError",
    "ResumeMismatch",
    "Ring",
    "RingLayout",
    "RingTimeout",
    "RingfeedError",
    "RingfeedWarning",
    "StreamFinished",
    "TensorSpec",
    "evaluation",
    "info",
    "runtime_dir",
    "serve",
]

try:
    # The package's version is the crate's (Cargo.toml), which `ringfeed --version` prints too.
    __version__ = _version("ringfeed")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
