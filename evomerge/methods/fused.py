"""TIES' sign-consensus merge as one compiled elementwise kernel, for the in-place path's large tensors.

Once the trim (TIES) or the drop (DARE) is known per entry, the rest of the merge is elementwise: mask,
weight, elect a sign, keep the agreeing entries, divide by their weights, scale, add to the base. Eager
torch runs each of those ~30 steps as its own pass over memory; ``torch.compile`` (inductor: C++ with
SIMD on CPU, Triton on CUDA) fuses them into one loop that reads each source entry once and writes the
result once, as a plain weighted sum does. On the merge bench that is 1.5x the bandwidth floor instead
of 8x (results/bench_merge.md).

The kernels compute what the eager methods compute, step for step and in the same order, and inductor
is told to round every intermediate to the working dtype as eager does (``emulate_precision_casts``,
which also keeps Triton from fusing multiply-adds; its C++ keeps ``-ffp-contract=off``), so the results
are the eager methods' bit for bit (tests/test_methods.py, test_precomputed_gives_the_same_merge): a merge written in place equals the same
recipe merged to disk.

Compiling costs once per process and per (model count, dtype, options): 2-3 minutes on a CPU where
inductor's cache (``TORCHINDUCTOR_CACHE_DIR``, by default under /tmp) does not hold the kernel yet, half a
minute where it does. A search's first candidate should not wait for that (issue 32: 134-144 s on every
start), and compiling always pays later (on the merge bench 1.5x the bandwidth floor instead of 8x, over
hundreds of candidates). So the first call queues a kernel's build, on a small sample of its arguments,
and calls merge eagerly with the same numbers; the in-place path starts the build once its first candidate
is merged (``start_building``: compiling beside that merge slowed it more than the compile cost, on 2 busy
cores), in a background thread, while the candidate is scored; once built, calls run the kernel. The run's
output says which path runs and why. Where compiling fails (no C++ compiler, an unsupported
device) the same functions keep running eagerly, slower and with the same results.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from torch.torch_version import TorchVersion

log = logging.getLogger(__name__)

# Below this many entries a tensor is merged eagerly: a compiled call's fixed cost (guards, wrappers; 0.1-0.3 ms
# on CPU) is then about what the passes it saves cost.
MIN_ENTRIES = 1 << 15

# Model counts, dtypes and options compile once each; shapes are dynamic, so tensors of every size share one kernel.
_OPTIONS = {"emulate_precision_casts": True}
# Entries of the sample a kernel is built on in the background: enough that no size is specialised (0 and 1
# are), few enough that running it costs nothing.
_SAMPLE = 1 << 12
_compiled: dict[Callable, Callable] = {}  # eager function -> compiled, once built
_building: set[Callable] = set()  # eager functions whose kernel is queued or being built
_broken: list[str] = []  # why compiling failed, once it has: every later call runs eagerly
_builds: queue.Queue = queue.Queue()  # (eager function, sample arguments, options), built one at a time
_builder: list[threading.Thread] = []


def worth_fusing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is large enough for the compiled kernels to pay, on a device, dtype and torch
    where they were checked bit-equal to eager; otherwise the same functions run eagerly (``compiled=False``)."""
    return tensor.numel() >= MIN_ENTRIES and checked_bit_equal(tensor.device.type, tensor.dtype, torch.__version__)


def checked_bit_equal(device_type: str, dtype: torch.dtype, torch_version: str) -> bool:
    """Where the compiled kernels were seen to give the eager methods' numbers bit for bit.

    CPU (inductor's C++): torch >= 2.13 in every float dtype (the suite, on every run); torch 2.11 gave
    1-ulp differences in bfloat16. CUDA (Triton): bfloat16 on an H200 with torch 2.11; float32 there did
    not equal eager (results/gpu_check_cuda.md), so float32 and the unchecked float16 merge eagerly.
    """
    if device_type == "cpu":
        return TorchVersion(torch_version) >= "2.13"
    return device_type == "cuda" and dtype == torch.bfloat16


def ties_by_threshold(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    thresholds: torch.Tensor,
    weights: torch.Tensor,
    lambda_: float,
    *,
    normalize: bool,
    compiled: bool,
) -> torch.Tensor:
    """TIES without rescaling: model i keeps its entries with ``|delta| >= thresholds[i]``.

    ``thresholds`` and ``weights`` in the deltas' dtype. Where a trim's cut splits equal magnitudes the
    caller passes the next float above them, keeping none of them, and merges those entries itself.
    """
    _run(_ties_by_threshold, compiled, *_flat(out, base, deltas), thresholds, weights, lambda_, normalize=normalize)
    return out


def ties_by_draws(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    draws: torch.Tensor,
    rows: tuple[int, ...],
    cuts: torch.Tensor,
    divisors: torch.Tensor,
    weights: torch.Tensor,
    lambda_: float,
    *,
    normalize: bool,
    rescale: bool,
    compiled: bool,
) -> torch.Tensor:
    """DARE-TIES given its draws (float32 ``[N, numel]`` 24-bit words, dare.py): model i keeps its entries
    where ``draws[rows[i]] < cuts[i]`` (the mask ``sparsify.bernoulli`` draws from the same words),
    divided by ``divisors[i]`` when ``rescale``. ``cuts`` float32, ``divisors`` and ``weights`` in the
    deltas' dtype."""
    arguments = (draws, rows, cuts, divisors, weights, lambda_)
    _run(_ties_by_draws, compiled, *_flat(out, base, deltas), *arguments, normalize=normalize, rescale=rescale)
    return out


def _flat(out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """1-D views: one compiled graph serves every tensor shape (a 2-D one specialises on e.g. square matrices)."""
    return out.view(-1), base.reshape(-1), deltas.reshape(len(deltas), -1)


def _ties_by_threshold(out, base, deltas, thresholds, weights, lambda_, *, normalize):
    weighted = [
        torch.where(delta.abs() >= limit, delta * w, 0.0)
        for delta, limit, w in zip(deltas, thresholds, weights, strict=True)
    ]
    return _agreeing_sum(out, base, weighted, weights, lambda_, normalize=normalize)


def _ties_by_draws(out, base, deltas, draws, rows, cuts, divisors, weights, lambda_, *, normalize, rescale):
    weighted = []
    for delta, row, cut, p, w in zip(deltas, rows, cuts, divisors, weights, strict=True):
        kept = delta / p if rescale else delta
        weighted.append(torch.where(draws[row] < cut, kept, 0.0) * w)
    return _agreeing_sum(out, base, weighted, weights, lambda_, normalize=normalize)


def _agreeing_sum(out, base, weighted, weights, lambda_, *, normalize):
    """``merge_task_vectors``' sign-consensus branch on already weighted task vectors, in its order of
    operations: sum left to right, +1 where the sum is >= 0, agreeing entries summed left to right,
    divided by their summed weights (1 where none agreed), times lambda, plus the base."""
    total = weighted[0]
    for more in weighted[1:]:
        total = total + more
    positive = total >= 0
    mixed = divisor = None
    for entry, w in zip(weighted, weights, strict=True):
        agrees = torch.where(positive, entry > 0, entry < 0)
        part = torch.where(agrees, entry, 0.0)
        mixed = part if mixed is None else mixed + part
        if normalize:
            share = torch.where(agrees, w, 0.0)
            divisor = share if divisor is None else divisor + share
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    out.copy_(mixed * lambda_ + base)
    return out


def start_building() -> None:
    """Start compiling the queued kernels in a background thread, unless it runs already."""
    if not _builder and _building:
        # A daemon: a process that ends mid-build (a short merge) does not wait for the compiler.
        _builder.append(threading.Thread(target=_build_kernels, name="evomerge-compile", daemon=True))
        _builder[0].start()


def wait_for_kernels() -> None:
    """Build the queued kernels and block until they are built (or compiling has failed): for callers that
    time or check the compiled kernels (scripts/bench_merge.py, tests)."""
    start_building()
    _builds.join()


def _run(fn: Callable, compiled: bool, *args, **options) -> torch.Tensor:
    """``fn`` compiled where ``compiled`` asks for it and its kernel is built; else ``fn`` itself, queueing
    the kernel's build on the first such call."""
    kernel = _compiled.get(fn) if compiled and not _broken else None
    if kernel is None:
        if compiled and not _broken and fn not in _building:
            _queue_build(fn, args, options)
        return fn(*args, **options)
    try:
        return kernel(*args, **options)
    except torch.OutOfMemoryError:
        raise  # the device is full, not the compiler broken: the eager kernels need more memory, not less
    except Exception as error:  # noqa: BLE001 - any compiler failure leaves the eager function: same numbers
        _give_up(error)
    return fn(*args, **options)


def _queue_build(fn: Callable, args: tuple, options: dict) -> None:
    entries = args[0].numel()  # every call's first argument is the flat output
    # The sample: the first entries of every per-entry argument (the rest are per model), copied, so the
    # build neither writes the caller's output nor holds its tensors.
    sample = tuple(
        a[..., :_SAMPLE].clone() if isinstance(a, torch.Tensor) and a.ndim and a.shape[-1] == entries else a
        for a in args
    )
    _building.add(fn)
    _builds.put((fn, sample, options))
    print(
        f"evomerge: {fn.__name__.strip('_')} merges eagerly until torch.compile has built its fused kernel in the "
        "background, from the end of the first candidate on (minutes where inductor's cache lacks it; the same "
        "numbers either way)",
        flush=True,
    )


def _build_kernels() -> None:
    while True:
        fn, sample, options = _builds.get()
        started = time.perf_counter()
        try:
            kernel = torch.compile(fn, dynamic=True, fullgraph=True, options=_OPTIONS)
            kernel(*sample, **options)
        except Exception as error:  # noqa: BLE001 - see _run
            _give_up(error)
        else:
            _compiled[fn] = kernel
            print(
                f"evomerge: {fn.__name__.strip('_')}'s fused kernel built in {time.perf_counter() - started:.0f} s; "
                "merging with it from now on",
                flush=True,
            )
        finally:
            _builds.task_done()


def _give_up(error: Exception) -> None:
    _broken.append(f"{type(error).__name__}: {error}")
    log.warning("torch.compile failed; merging with eager kernels from now on (slower): %s", _broken[0])
