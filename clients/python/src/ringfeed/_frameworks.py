"""Optional framework bridges: PyTorch tensors, JAX arrays and CUDA pinning of the mapping."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .errors import RingfeedWarning

_BF16 = 5
# torch.from_numpy warns that writing through a tensor made from a read-only array is
# undefined. Here writing faults (the data mapping is PROT_READ), which is the intended
# protection, so exactly that warning is silenced while the per-slot tensors are built.
_NOT_WRITABLE = "The given NumPy array is not writable"


def torch_slot_tensors(arrays: dict[str, np.ndarray], codes: dict[str, int]) -> dict[str, Any]:
    """Torch tensors sharing memory with ``arrays`` (no copy); bf16 bits become ``bfloat16``."""
    import torch

    tensors: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        for name, array in arrays.items():
            tensor = torch.from_numpy(array)
            if codes[name] == _BF16:
                tensor = tensor.view(torch.bfloat16)
            tensors[name] = tensor
    return tensors


def jax_array(array: np.ndarray, code: int) -> Any:
    """A JAX array holding a COPY of ``array`` (JAX arrays are immutable; the slot is not)."""
    import jax
    import jax.numpy as jnp

    copied = jnp.array(array, copy=True)
    if code == _BF16:
        copied = jax.lax.bitcast_convert_type(copied, jnp.bfloat16)
    return copied


_CUDA_HOST_REGISTER_READ_ONLY = 0x08


def cuda_pin(address: int, size: int) -> bool:
    """``cudaHostRegister`` the range once so host→device copies DMA straight from the ring.

    Returns False (after one :class:`RingfeedWarning`) when torch or CUDA is unavailable or
    registration fails; the loader works unpinned then.
    """
    try:
        import torch
    except ImportError:
        warnings.warn("pin=True but torch is not installed; batches stay unpinned",
                      RingfeedWarning, stacklevel=4)  # fmt: skip
        return False
    if not torch.cuda.is_available():
        warnings.warn("pin=True but CUDA is not available; batches stay unpinned",
                      RingfeedWarning, stacklevel=4)  # fmt: skip
        return False
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call,unused-ignore]
    # The mapping is read-only: plain registration may be refused for lack of write access, so
    # fall back to cudaHostRegisterReadOnly (CUDA 11.1+).
    for flags in (0, _CUDA_HOST_REGISTER_READ_ONLY):
        if int(cudart.cudaHostRegister(address, size, flags)) == 0:
            return True
    warnings.warn("cudaHostRegister of the ring failed; batches stay unpinned",
                  RingfeedWarning, stacklevel=4)  # fmt: skip
    return False


def cuda_unpin(address: int) -> None:
    """Undo :func:`cuda_pin`."""
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call,unused-ignore]
