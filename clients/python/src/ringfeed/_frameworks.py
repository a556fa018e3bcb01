"""Optional framework bridges: PyTorch tensors, JAX arrays and CUDA pinning of the mapping."""

from __future__ import annotations

import os
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
    # The data mapping is PROT_READ, so plain registration (flags 0) is refused for lack of
    # write access: ask for cudaHostRegisterReadOnly (CUDA 11.1+) first, plain as the fallback.
    for flags in (_CUDA_HOST_REGISTER_READ_ONLY, 0):
        if int(cudart.cudaHostRegister(address, size, flags)) == 0:
            return True
        _clear_last_cuda_error(cudart)
    warnings.warn("cudaHostRegister of the ring failed; batches stay unpinned",
                  RingfeedWarning, stacklevel=4)  # fmt: skip
    return False


def _clear_last_cuda_error(cudart: Any) -> None:
    """Read back (and so clear) CUDA's "last error" after a refused registration.

    A refused ``cudaHostRegister`` leaves ``cudaErrorInvalidValue`` as the runtime's last
    error, and torch checks that after its next kernel launch: the caller's first GPU op would
    then fail with "invalid argument" (seen on an H200 with torch 2.11). torch's ``cudart()``
    does not always expose ``cudaGetLastError``; the runtime library torch loaded does.
    """
    get_last = getattr(cudart, "cudaGetLastError", None)
    if get_last is not None:
        get_last()
        return
    library = _loaded_cudart()
    if library is not None:
        library.cudaGetLastError()


def _loaded_cudart() -> Any:
    """The CUDA runtime already mapped into this process (by torch), or None."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:  # RTLD_NOLOAD: the copy torch uses, never a second one
            return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
    return None


def cuda_unpin(address: int) -> None:
    """Undo :func:`cuda_pin`."""
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call,unused-ignore]
