"""ringfeed: zero-copy batches from the ringfeed daemon's shared-memory ring.

Brief overview: :class:`Loader` attaches to one lane of a running ``ringfeed serve`` and
yields :class:`Batch` objects whose tensors are read-only numpy arrays (or torch tensors)
viewing the ring; :class:`Ring` is the low-level, validated mapping of a ring file, written
from ``docs/ring-format.md``. Every error derives from :class:`RingfeedError`.
"""

from .batch import Batch
from .errors import (
    AttachError,
    FormatError,
    ProducerGone,
    ReleasedBatchError,
    RingfeedError,
    RingfeedWarning,
    RingTimeout,
)
from .layout import RingLayout, TensorSpec
from .loader import Loader, evaluation
from .protocol import info
from .ring import Ring
from .runtime import runtime_dir

__all__ = [
    "AttachError",
    "Batch",
    "FormatError",
    "Loader",
    "ProducerGone",
    "ReleasedBatchError",
    "Ring",
    "RingLayout",
    "RingTimeout",
    "RingfeedError",
    "RingfeedWarning",
    "TensorSpec",
    "evaluation",
    "info",
    "runtime_dir",
]

__version__ = "0.1.0"
