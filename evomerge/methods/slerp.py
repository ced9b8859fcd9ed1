"""Spherical linear interpolation between the base tensor and one other model's, over the whole
flattened tensor, as mergekit 0.1.5 computes it."""

from __future__ import annotations

import torch

from evomerge.methods.registry import T, merge_method

# mergekit's constants: norms at or below _NORM_EPS count as 1 (a zero tensor stays finite), and
# |cos| above _COLINEAR falls back to linear interpolation, where sin(theta) would vanish.
_NORM_EPS = 1e-8
_COLINEAR = 0.9995
# mergekit's chunk: 16-bit inputs are converted to float32 this many entries at a time. It is also the
# boundary of mergekit's partial sums, so it must stay mergekit's for the cosine to round as mergekit's
# does (mergekit-yaml merges one tensor per batch, so its chunk is the whole 2**20).
_CHUNK = 1 << 20


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cosine(base: torch.Tensor, tensors: torch.Tensor) -> torch.Tensor:
    """The cosine between the base and the other tensor, which decides slerp's branch, as a ``[1, 1]``
    tensor in the working dtype: all slerp needs from its inputs besides t.

    It is mergekit's computation operation for operation (each norm the norm of its chunks' norms, the
    dot taken between chunks already divided by those norms, summed per chunk and then across chunks),
    so that it rounds as mergekit's does: a cosine within a float32 ulp of 0.9995, which real
    fine-tunes reach, otherwise takes the other branch and moves the merge by ~1e-4. Torch's cascaded
    float32 sums keep it within ~1e-7 of the exact cosine even over a 262k-row embedding.
    """
    work = _work_dtype(base.dtype)
    a, b = base.reshape(1, -1), tensors[0].reshape(1, -1)
    spans = [slice(start, start + _CHUNK) for start in range(0, a.shape[1], _CHUNK)]
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, s].to(work), dim=1, keepdim=True) for s in spans]), dim=0
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[:, s].to(work), dim=1, keepdim=True) for s in spans]), dim=0
    )
    norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1)
    x, y = _chunk_buffers(a, work)
    dots = []
    for span in spans:
        # mergekit's (x / norm_a) * (y / norm_b), rounded alike (a 16-bit input converts exactly to float32).
        width = a[:, span].shape[1]
        torch.div(a[:, span], norm_a, out=x[:, :width])
        torch.div(b[:, span], norm_b, out=y[:, :width])
        dots.append(x[:, :width].mul_(y[:, :width]).sum(dim=1, keepdim=True))
    return torch.stack(dots).sum(dim=0).clamp(-1, 1)


def _chunk_buffers(a: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two chunks of scratch, written in place: a chunk-sized temporary per operation is a fresh mapping
    from the OS once glibc has trimmed the last one, whose page faults cost more than the arithmetic (a
    third of the merge of a 262k x 640 embedding)."""
    x = torch.empty(1, min(_CHUNK, a.shape[1]), dtype=work, device=a.device)
    return x, torch.empty_like(x)


@merge_method(
    name="slerp",
    reference="https://en.wikipedia.org/wiki/Slerp",
    params=(T,),
    inputs="tensors",
    needs_base=True,
    min_models=1,
    max_models=1,
    precompute=cosine,
)
def slerp(
    base: torch.Tensor,
    tensors: torch.Tensor,
    *,
    t: float,
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slerp (Shoemake 1985, https://en.wikipedia.org/wiki/Slerp), t=0 gives the base, t=1 the other model."""
    work = _work_dtype(base.dtype)
    cos = precomputed if precomputed is not None else cosine(base, tensors)
    # t as mergekit holds it (a tensor of the working dtype), so 1 - t rounds as mergekit's does.
    t = torch.as_tensor(t, dtype=work, device=base.device).reshape(1, 1)
    colinear = cos.abs() > _COLINEAR
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    # torch.where on device scalars rather than an `if`: no host sync in the inner loop.
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)

    a, b = base.reshape(1, -1), tensors[0].reshape(1, -1)
    merged = torch.empty_like(a) if out is None else out.view(1, -1)
    x, y = _chunk_buffers(a, work)
    direct = merged.dtype == work  # else each chunk is rounded to the inputs' 16-bit dtype once, at the end
    for start in range(0, a.shape[1], _CHUNK):
        span = slice(start, start + _CHUNK)
        width = a[:, span].shape[1]
        # mergekit's coef_a * x + coef_b * y: two products and a sum, each rounded to the working dtype.
        result = merged[:, span] if direct else x[:, :width]
        torch.mul(a[:, span], coef_a, out=result)
        result.add_(torch.mul(b[:, span], coef_b, out=y[:, :width]))
        if not direct:
            merged[:, span] = result
    return merged.view(base.shape)
