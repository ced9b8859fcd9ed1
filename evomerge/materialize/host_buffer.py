"""The host tier's sources in one host buffer, page-locked as one block: what is pinned is what is counted.

``Tensor.pin_memory()`` (and ``pin_memory=True``) go through PyTorch's caching host allocator, which rounds
each block up to a power of two: Mistral-7B with three experts in bfloat16, 54 GiB of sources, pinned a
tensor at a time takes about 75 GiB of page-locked memory, and as one block it would take 64 GiB. Here the
sources are laid out back to back in one ordinary host tensor (its layout a function of the shapes alone,
so its bytes are known before anything is read), and that tensor's own pages are page-locked in place
with ``cudaHostRegister``: exactly its bytes, and copies from it to a GPU run asynchronously, as from any
pinned memory. ``executor/memory.py`` counts the same bytes as the host tier's ``sources``.
"""

from __future__ import annotations

import math
import weakref

import torch

# Per tensor name: the base's shape (None where the method takes no base) and the stacked inputs' shape.
Shapes = dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]]
Span = tuple[int, int]  # (offset, entries) in the buffer
PORTABLE = 1  # cudaHostRegisterPortable


def layout(shapes: Shapes) -> tuple[dict[str, tuple[Span | None, Span]], int]:
    """Where each tensor's ``(base, stacked)`` lies in one flat buffer, in order and without gaps, and the
    buffer's entries. No padding: a view is read only by the copy to the device (any alignment) or, on a
    CPU, by the merge, whose kernels take an element-aligned tensor."""
    spans, offset = {}, 0
    for name, (base, stacked) in shapes.items():
        base_span = None
        if base is not None:
            base_span, offset = (offset, math.prod(base)), offset + math.prod(base)
        spans[name] = (base_span, (offset, math.prod(stacked)))
        offset += math.prod(stacked)
    return spans, offset


class HostBuffer:
    """One host tensor holding every tensor's ``(base, stacked)`` as views; ``pin`` page-locks it."""

    def __init__(self, shapes: Shapes, *, dtype: torch.dtype) -> None:
        self.shapes = shapes
        self.spans, entries = layout(shapes)
        self.tensor = torch.empty(entries, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def views(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Tensor ``name``'s base and stacked inputs: views into the buffer, to be filled once."""
        (base_span, stacked_span), (base_shape, stacked_shape) = self.spans[name], self.shapes[name]
        base = None if base_span is None else self.tensor.narrow(0, *base_span).view(base_shape)
        return base, self.tensor.narrow(0, *stacked_span).view(stacked_shape)

    def pin(self, cudart=None) -> None:
        """Page-lock the buffer's own pages (``cudart``: ``torch.cuda.cudart()``), until this object goes.

        The merger that holds this buffer holds the views too, so the pages are unlocked before the memory
        is given back: unlocking after a free would leave the next owner of those pages locked."""
        cudart = cudart or torch.cuda.cudart()
        pointer = self.tensor.data_ptr()
        # cudaHostRegisterPortable: pinned for every GPU, as a worker spanning several copies to each of them.
        _check(cudart.cudaHostRegister(pointer, self.nbytes, PORTABLE), "cudaHostRegister", self.nbytes)
        weakref.finalize(self, _unregister, cudart, pointer)


def _unregister(cudart, pointer: int) -> None:
    cudart.cudaHostUnregister(pointer)


def _check(status, call: str, nbytes: int) -> None:
    if int(status) != 0:
        raise RuntimeError(f"{call} of {nbytes / 2**30:.2f} GiB of host memory failed with CUDA error {int(status)}")
