"""The merge methods: a contract every registered method passes, then each formula worked by hand."""

from __future__ import annotations

import importlib
import inspect
import math
import threading

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.methods import MergeMethod, get_method, method_names
from evomerge.methods.registry import WEIGHT, merge_method
from evomerge.methods.task_arithmetic import sparse_task_arithmetic

ALL = method_names()
RANDOM = [name for name in ALL if get_method(name).random]

# Values for the parameters mergekit requires (no default), and a density that actually prunes.
REQUIRED = {"weight": 0.7, "t": 0.4}
PRUNING = {"density": 0.5}


def call(
    name: str,
    base: torch.Tensor | None,
    models: torch.Tensor,
    seed: int = 0,
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
    **overrides,
) -> torch.Tensor:
    """Run method ``name`` on ``models`` ([N, ...] raw tensors) the way the materializer does: task
    vectors for delta methods, per-model values as a length-N tensor, a seeded generator if random."""
    method = get_method(name)
    count = models.shape[0]
    kwargs = {} if precomputed is None else {"precomputed": precomputed}
    for param in method.params:
        value = overrides.get(param.arg, REQUIRED.get(param.name, param.default))
        if param.per_model:
            values = value if isinstance(value, (list, tuple)) else [value] * count
            kwargs[param.arg] = torch.tensor(values, dtype=torch.float64, device=models.device)
        else:
            kwargs[param.arg] = value
    if method.random:
        kwargs["generator"] = torch.Generator(device=models.device).manual_seed(seed)
    inputs = models - base if method.inputs == "deltas" else models
    return method.merge(base, inputs, **kwargs, out=out)


def model_counts(method: MergeMethod) -> list[int]:
    allowed = [n for n in (1, 2, 3) if n >= method.min_models and (method.max_models is None or n <= method.max_models)]
    return sorted({allowed[0], allowed[-1]})


def pruning(name: str) -> dict:
    return PRUNING if any(p.name == "density" for p in get_method(name).params) else {}


# ---------------------------------------------------------------------------------------------------
# The contract every registered method passes.


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_finite_for_each_model_count(name: str, dtype: torch.dtype) -> None:
    method = get_method(name)
    generator = torch.Generator().manual_seed(1)
    for count in model_counts(method):
        base = torch.randn(6, 10, generator=generator).to(dtype)
        models = (base + 0.1 * torch.randn(count, 6, 10, generator=generator)).to(dtype)
        merged = call(name, base, models, **pruning(name))
        assert merged.shape == base.shape and merged.dtype == dtype
        assert torch.isfinite(merged).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)])
def test_other_ranks(name: str, shape: tuple[int, ...]) -> None:
    method = get_method(name)
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=generator)
    models = base + 0.1 * torch.randn((model_counts(method)[-1], *shape), generator=generator)
    merged = call(name, base, models, **pruning(name))
    assert merged.shape == shape and torch.isfinite(merged).all()


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_not_mutated(name: str) -> None:
    method = get_method(name)
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(5, 8, generator=generator)
    models = base + torch.randn(model_counts(method)[-1], 5, 8, generator=generator)
    inputs = models - base if method.inputs == "deltas" else models
    base_copy, inputs_copy = base.clone(), inputs.clone()
    kwargs = {"generator": torch.Generator().manual_seed(0)} if method.random else {}
    for param in method.params:
        value = {**REQUIRED, **pruning(name)}.get(param.name, param.default)
        kwargs[param.arg] = torch.full((inputs.shape[0],), value) if param.per_model else value
    method.merge(base, inputs, **kwargs)
    assert torch.equal(base, base_copy) and torch.equal(inputs, inputs_copy)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_of_one_model_merge_to_that_model(name: str, dtype: torch.dtype) -> None:
    """N copies of a model, weights summing to 1, nothing pruned: every method returns the model
    (slerp: t = 1; model_stock: identical task vectors give cos = 1, hence t = 1; nearswap: a distance
    t beyond every difference takes each entry whole). arcee_fusion keeps the base wherever the model's
    entry is no outlier, so its copies include the base."""
    method = get_method(name)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(4, 6, generator=generator).to(dtype)
    model = (base.float() + torch.randn(4, 6, generator=generator)).to(dtype)
    if name == "arcee_fusion":
        base = model.clone()
    count = model_counts(method)[-1]
    t = 1e3 if name == "nearswap" else 1.0
    merged = call(name, base, model.expand(count, 4, 6), weight=1 / count, t=t)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(merged.float(), model.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("name", [n for n in ALL if any(p.name == "weight" for p in get_method(n).params)])
def test_weight_one_on_one_model_selects_it(name: str) -> None:
    count = model_counts(get_method(name))[-1]
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, generator=generator)
    models = base + torch.randn(count, 4, 6, generator=generator)
    merged = call(name, base, models, weight=[0.0, 1.0, 0.0][:count])
    torch.testing.assert_close(merged, models[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_signature_matches_declared_parameters(name: str) -> None:
    """The registry is the one source of truth: the function takes exactly the declared knobs."""
    method = get_method(name)
    parameters = inspect.signature(method.fn).parameters
    keyword_only = {p for p, spec in parameters.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY}
    if any(spec.kind is inspect.Parameter.VAR_KEYWORD for spec in parameters.values()):
        # Generalized task arithmetic: the per-model knobs (and a generator) are its sparsify step's.
        step = inspect.signature(dict(method.fixed)["sparsify"]).parameters
        keyword_only |= set(step) - {"delta", "out", "rescale", "words"}
    expected = {p.arg for p in method.params} | ({"generator"} if method.random else set()) | {"out"}
    expected |= {"precomputed"} if method.precompute is not None else set()
    expected |= {name for name, _ in method.fixed}  # a twin's step, fixed by its name
    assert keyword_only == expected
    assert list(parameters)[:2] == ["base", "tensors" if method.inputs == "tensors" else "deltas"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_into_out_exactly_what_it_returns(name: str, dtype: torch.dtype) -> None:
    """``out=`` (the in-place path passes a model's parameter) holds the very numbers a fresh result
    would, and what was in it before does not leak in."""
    method = get_method(name)
    generator = torch.Generator().manual_seed(7)
    for count in model_counts(method):
        base = torch.randn(6, 10, generator=generator).to(dtype)
        models = (base + 0.1 * torch.randn(count, 6, 10, generator=generator)).to(dtype)
        fresh = call(name, base, models, **pruning(name))
        out = torch.full_like(base, float("nan"))
        returned = call(name, base, models, **pruning(name), out=out)
        assert returned.data_ptr() == out.data_ptr()
        assert torch.equal(out, fresh)


PRECOMPUTING = [n for n in ALL if get_method(n).precompute is not None]
FUSED = ["ties", "dare_ties"]  # the methods whose in-place path runs compiled kernels (methods/fused.py)


@pytest.mark.parametrize(
    ("name", "compiled"), [(n, False) for n in PRECOMPUTING] + [(n, True) for n in FUSED], ids=lambda v: str(v)
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precomputed_gives_the_same_merge(
    name: str, compiled: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a method precomputes from its inputs (kept by the in-place path across candidates) changes
    no number, also where the trim's cut falls among equal magnitudes (a quarter of the task-vector
    entries are exactly 0.25, the cut at density 0.1 lands inside them; bf16 adds ties of its own) or
    among zeros (a quarter of the last task vector; density 0.9). ``compiled``: tensors this small run
    the torch.compile'd kernels too, which must give the eager numbers bit for bit."""
    from evomerge.methods import fused

    method = get_method(name)
    # DARE given its draws merges a chunk at a time when not compiled: chunks of 100 entries put
    # boundaries inside the tensor.
    monkeypatch.setattr("evomerge.methods.dare._CHUNK", 100)
    monkeypatch.setattr(fused, "MIN_ENTRIES", 0 if compiled else 1 << 40)
    generator = torch.Generator().manual_seed(8)
    base = (torch.randint(-8, 8, (16, 32), generator=generator) / 8).to(dtype)  # + 0.25 is exact
    models = (base + 0.1 * torch.randn(model_counts(method)[-1], 16, 32, generator=generator)).to(dtype)
    models[:, :4] = base[:4] + 0.25
    models[-1, 8:12] = base[8:12]
    # A random method's precompute draws from the generator the method would draw from (call's seed 0).
    extra = {"generator": torch.Generator().manual_seed(0)} if method.random else {}
    precomputed = method.precompute(base, models - base if method.inputs == "deltas" else models, **extra)
    if compiled:
        # The first call queues the kernel's build and merges eagerly; once built, the calls below run it.
        call(name, base, models, precomputed=precomputed)
        fused.wait_for_kernels()
    for density in (0.1, 0.5, 0.9):
        for normalize in (True, False):
            overrides = {"density": density} if any(p.name == "density" for p in method.params) else {}
            overrides |= {"normalize": normalize} if any(p.name == "normalize" for p in method.params) else {}
            plain = call(name, base, models, **overrides)
            cached = call(name, base, models, **overrides, precomputed=precomputed)
            assert torch.equal(plain, cached), (density, normalize)
    assert not fused._broken
    # Compiled where this torch's kernels are known bit-equal (fused.checked_bit_equal); eager elsewhere.
    assert bool(fused._compiled) or not (compiled and fused.checked_bit_equal("cpu", dtype, torch.__version__))


def test_fused_kernels_fall_back_to_eager_when_compiling_fails(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A machine where torch.compile fails (no C++ compiler, say) merges with the same functions run
    eagerly: a warning, the same numbers, and no further attempt."""
    from evomerge.methods import fused

    if not fused.checked_bit_equal("cpu", torch.float32, torch.__version__):
        pytest.skip(f"torch {torch.__version__} runs the kernels eagerly on the CPU: nothing is compiled")

    def broken_compile(fn, **options):
        def raises(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return raises

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "MIN_ENTRIES", 0)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_building", set())
    monkeypatch.setattr(fused, "_broken", [])
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(8, 16, generator=generator)
    models = base + 0.1 * torch.randn(2, 8, 16, generator=generator)
    order = get_method("ties").precompute(base, models - base)
    with caplog.at_level("WARNING", logger="evomerge.methods.fused"):
        merged = call("ties", base, models, density=0.5, precomputed=order)
        fused.wait_for_kernels()
        again = call("ties", base, models, density=0.7, precomputed=order)
    assert torch.equal(merged, call("ties", base, models, density=0.5))
    assert torch.equal(again, call("ties", base, models, density=0.7))
    assert fused._broken == ["RuntimeError: no C++ compiler"]
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1


def test_the_first_call_merges_eagerly_while_the_kernel_compiles(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The first candidate does not wait minutes for torch.compile (issue 32): the first call merges eagerly
    and says so, the kernel is built in the background once asked to (after the in-place path's first
    candidate), and the calls after it run the kernel."""
    from evomerge.methods import fused

    if not fused.checked_bit_equal("cpu", torch.float32, torch.__version__):
        pytest.skip(f"torch {torch.__version__} runs the kernels eagerly on the CPU: nothing is compiled")
    built = threading.Event()
    compiled_calls = []

    def slow_compile(fn, **options):
        def kernel(*args, **kwargs):
            built.wait(timeout=60)  # the compiler is still at work when the first call returns
            compiled_calls.append(fn)
            return fn(*args, **kwargs)

        return kernel

    monkeypatch.setattr(torch, "compile", slow_compile)
    monkeypatch.setattr(fused, "MIN_ENTRIES", 0)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_building", set())
    monkeypatch.setattr(fused, "_broken", [])
    monkeypatch.setattr(fused, "_builder", [])
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(8, 16, generator=generator)
    models = base + 0.1 * torch.randn(2, 8, 16, generator=generator)
    order = get_method("ties").precompute(base, models - base)
    first = call("ties", base, models, density=0.5, precomputed=order)
    assert compiled_calls == [] and torch.equal(first, call("ties", base, models, density=0.5))
    assert "ties_by_threshold merges eagerly until torch.compile has built its fused kernel" in capsys.readouterr().out
    assert not fused._builder  # nothing compiles beside the first candidate
    built.set()
    fused.wait_for_kernels()
    assert "ties_by_threshold's fused kernel built in" in capsys.readouterr().out
    call("ties", base, models, density=0.5, precomputed=order)
    # Once on the build's sample, once for the call.
    assert [fn.__name__ for fn in compiled_calls] == ["_ties_by_threshold"] * 2


@pytest.mark.parametrize("name", ALL)
def test_docstring_is_one_line_citing_the_reference(name: str) -> None:
    method = get_method(name)
    if method.fn is sparse_task_arithmetic:
        # One function serves the sparsify-first methods; each one's module says what it is and cites it.
        doc = importlib.import_module(f"evomerge.methods.{name.split('_')[0]}").__doc__ or ""
        assert method.reference in doc
        return
    doc = method.fn.__doc__ or ""
    assert "\n" not in doc.strip() and method.reference in doc
    assert method.reference.startswith("https://")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_runs_on_cuda_like_on_cpu(name: str) -> None:
    method = get_method(name)
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(16, 32, generator=generator)
    models = base + torch.randn(model_counts(method)[-1], 16, 32, generator=generator)
    merged = call(name, base.cuda(), models.cuda(), **pruning(name))
    assert merged.device.type == "cuda"
    out = torch.empty_like(base.cuda())
    assert call(name, base.cuda(), models.cuda(), **pruning(name), out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, merged)  # random methods too: each call seeds a fresh generator
    if method.precompute is not None:
        inputs = (models - base if method.inputs == "deltas" else models).cuda()
        extra = {"generator": torch.Generator(device="cuda").manual_seed(0)} if method.random else {}
        precomputed = method.precompute(base.cuda(), inputs, **extra)
        cached = call(name, base.cuda(), models.cuda(), **pruning(name), precomputed=precomputed)
        assert cached.device.type == "cuda" and torch.equal(cached, merged)
    if not method.random:
        torch.testing.assert_close(merged.cpu(), call(name, base, models, **pruning(name)), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The registry.


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        merge_method(
            name="linear",
            reference="https://example.org",
            params=(WEIGHT,),
            inputs="tensors",
            needs_base=False,
        )(lambda base, tensors, *, weight: tensors[0])
    assert get_method("linear").reference == "https://arxiv.org/abs/2203.05482"


def test_unknown_method_is_a_user_error_listing_the_known_ones() -> None:
    with pytest.raises(EvomergeError, match="unknown merge method 'tie'.*ties"):
        get_method("tie")


def test_every_mergekit_method_is_registered() -> None:
    assert set(ALL) >= {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "sce",
        "nuslerp",
        "multislerp",
        "karcher",
        "arcee_fusion",
        "nearswap",
    }


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        ("linear", {"weight": None, "normalize": True}),
        ("slerp", {"t": None}),
        ("task_arithmetic", {"weight": None, "normalize": False, "lambda": 1.0}),
        (
            "ties",
            {
                "weight": None,
                "density": 1.0,
                "normalize": True,
                "rescale": False,
                "lambda": 1.0,
                "int8_mask": False,
            },
        ),
        (
            "dare_ties",
            {
                "weight": None,
                "density": 1.0,
                "normalize": False,
                "rescale": True,
                "lambda": 1.0,
                "int8_mask": False,
            },
        ),
        (
            "dare_linear",
            {"weight": None, "density": 1.0, "normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False},
        ),
        (
            "breadcrumbs",
            {
                "weight": None,
                "density": 1.0,
                "gamma": 0.01,
                "normalize": False,
                "rescale": False,
                "lambda": 1.0,
                "int8_mask": False,
            },
        ),
        (
            "della",
            {
                "weight": None,
                "density": 1.0,
                "epsilon": 0.15,
                "normalize": True,
                "rescale": True,
                "lambda": 1.0,
                "int8_mask": False,
            },
        ),
        ("model_stock", {"filter_wise": False}),
        ("sce", {"select_topk": 1.0, "int8_mask": False}),
        ("nuslerp", {"weight": None, "nuslerp_row_wise": False, "nuslerp_flatten": True}),
        ("multislerp", {"weight": None, "normalize_weights": True, "eps": 1e-8}),
        ("karcher", {"max_iter": 10, "tol": 1e-5}),
        ("arcee_fusion", {}),
        ("nearswap", {"t": None}),
    ],
)
def test_mergekit_defaults(name: str, defaults: dict) -> None:
    assert {p.name: p.default for p in get_method(name).params} == defaults


# ---------------------------------------------------------------------------------------------------
# Formulas worked by hand.

BASE4 = torch.tensor([1.0, 1.0, 1.0, 1.0])


def deltas_to_models(*deltas: list[float]) -> torch.Tensor:
    return BASE4 + torch.tensor(deltas)


def test_linear_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    models = torch.stack([a, b])
    # (1*a + 3*b) / 4 = [[16, 20], [24, 28]] / 4
    expected = torch.tensor([[4.0, 5.0], [6.0, 7.0]])
    torch.testing.assert_close(call("linear", None, models, weight=[1.0, 3.0]), expected)
    # Without normalize the weights apply as given: 2a - b = [[2-5, 4-6], [6-7, 8-8]]
    torch.testing.assert_close(
        call("linear", None, models, weight=[2.0, -1.0], normalize=False),
        torch.tensor([[-3.0, -2.0], [-1.0, 0.0]]),
    )
    # A weight of 0 drops the model; normalize divides by the remaining 2: (2a + 0b)/2 = a
    torch.testing.assert_close(call("linear", None, models, weight=[2.0, 0.0]), a)


def test_slerp_by_hand() -> None:
    def slerp(base: list[float], other: list[float], t: float) -> torch.Tensor:
        return call("slerp", torch.tensor(base), torch.tensor([other]), t=t)

    r = math.sqrt(0.5)
    # Orthogonal unit vectors, theta = pi/2: coefficients sin((1-t) pi/2), sin(t pi/2).
    torch.testing.assert_close(slerp([1.0, 0.0], [0.0, 1.0], 0.5), torch.tensor([r, r]))
    # t = 1/3: sin(pi/3) = 0.8660254, sin(pi/6) = 0.5
    torch.testing.assert_close(slerp([1.0, 0.0], [0.0, 1.0], 1 / 3), torch.tensor([0.8660254, 0.5]))
    # The coefficients multiply the unnormalised tensors: [2*r, 3*r]
    torch.testing.assert_close(slerp([2.0, 0.0], [0.0, 3.0], 0.5), torch.tensor([2 * r, 3 * r]))
    # Colinear (cos = 1 > 0.9995): plain lerp, 0.75*[1, 2] + 0.25*[2, 4] = [1.25, 2.5]
    torch.testing.assert_close(slerp([1.0, 2.0], [2.0, 4.0], 0.25), torch.tensor([1.25, 2.5]))
    # Antipodal (cos = -1) also falls back to lerp: 0.5*[1, 0] + 0.5*[-1, 0] = 0
    torch.testing.assert_close(slerp([1.0, 0.0], [-1.0, 0.0], 0.5), torch.tensor([0.0, 0.0]))
    # Endpoints are exact.
    assert torch.equal(slerp([0.3, -1.2], [2.0, 0.7], 0.0), torch.tensor([0.3, -1.2]))
    assert torch.equal(slerp([0.3, -1.2], [2.0, 0.7], 1.0), torch.tensor([2.0, 0.7]))


def test_slerp_at_sixty_degrees() -> None:
    # cos = 0.5, theta = pi/3, t = 1/2: each coefficient sin(pi/6)/sin(pi/3) = 0.5/0.8660254 = 0.5773503
    # result = 0.5773503 * ([1, 0] + [0.5, 0.8660254]) = [0.8660254, 0.5]
    merged = call("slerp", torch.tensor([1.0, 0.0]), torch.tensor([[0.5, math.sqrt(3) / 2]]), t=0.5)
    torch.testing.assert_close(merged, torch.tensor([0.8660254, 0.5]))


def test_task_arithmetic_by_hand() -> None:
    models = deltas_to_models([1.0, -2.0, 0.0, 4.0], [3.0, 2.0, -1.0, 0.0])
    # 0.5*d1 + 1*d2 = [0.5+3, -1+2, 0-1, 2+0] = [3.5, 1, -1, 2]; lambda 2 -> [7, 2, -2, 4]; + base 1
    merged = call("task_arithmetic", BASE4, models, weight=[0.5, 1.0], lambda_=2.0)
    torch.testing.assert_close(merged, torch.tensor([8.0, 3.0, -1.0, 5.0]))
    # normalize divides by 0.5 + 1 = 1.5 before lambda: [3.5, 1, -1, 2] / 1.5 + 1
    merged = call("task_arithmetic", BASE4, models, weight=[0.5, 1.0], normalize=True)
    torch.testing.assert_close(merged, torch.tensor([3.5 / 1.5 + 1, 1 / 1.5 + 1, -1 / 1.5 + 1, 2 / 1.5 + 1]))
    # Weights summing to 0: mergekit leaves the sum undivided: d1 - d2 = [-2, -4, 1, 4]; + base
    merged = call("task_arithmetic", BASE4, models, weight=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(merged, torch.tensor([-1.0, -3.0, 2.0, 5.0]))


def test_lambda_scales_the_merged_task_vector_after_normalizing() -> None:
    models = deltas_to_models([2.0, 2.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0])
    # (1*2 + 3*4) / 4 = 3.5, times lambda 0.5 = 1.75, plus base 1 = 2.75
    merged = call("task_arithmetic", BASE4, models, weight=[1.0, 3.0], normalize=True, lambda_=0.5)
    torch.testing.assert_close(merged, torch.full((4,), 2.75))
    # lambda 0 returns the base.
    assert torch.equal(call("task_arithmetic", BASE4, models, weight=[1.0, 3.0], lambda_=0.0), BASE4)


# Three task vectors for TIES, with the kept entries (density 0.5 keeps the 2 largest of 4) marked:
#   d1 = [ 3*, -1,  0.5, -2*]  ->  [3,  0,  0, -2]
#   d2 = [-1,  -4*, 2*,   1 ]  ->  [0, -4,  2,  0]
#   d3 = [ 2*,  1, -3*,   0.1] ->  [2,  0, -3,  0]
TIES_MODELS = deltas_to_models([3.0, -1.0, 0.5, -2.0], [-1.0, -4.0, 2.0, 1.0], [2.0, 1.0, -3.0, 0.1])


def test_ties_trim_elect_and_disjoint_mean_by_hand() -> None:
    # Column sums of the trimmed vectors: [5, -4, -1, -2] -> elected signs [+, -, -, -].
    # Agreeing entries: col0 {3, 2} mean 2.5; col1 {-4}; col2 {-3} (d2's +2 disagrees); col3 {-2}.
    merged = call("ties", BASE4, TIES_MODELS, weight=1.0, density=0.5)
    torch.testing.assert_close(merged, BASE4 + torch.tensor([2.5, -4.0, -3.0, -2.0]))
    # Without normalize the agreeing entries are summed: [5, -4, -3, -2].
    merged = call("ties", BASE4, TIES_MODELS, weight=1.0, density=0.5, normalize=False)
    torch.testing.assert_close(merged, BASE4 + torch.tensor([5.0, -4.0, -3.0, -2.0]))


def test_ties_elects_signs_from_weighted_task_vectors() -> None:
    # Weights [1, 2, 1]: weighted trimmed d2 = [0, -8, 4, 0]. Column 2 now sums to 4 - 3 = +1, so d2
    # wins there: 4 / weight 2 = 2. Column 0: (3 + 2) / (1 + 1) = 2.5; column 1: -8 / 2; column 3: -2 / 1.
    merged = call("ties", BASE4, TIES_MODELS, weight=[1.0, 2.0, 1.0], density=0.5)
    torch.testing.assert_close(merged, BASE4 + torch.tensor([2.5, -4.0, 2.0, -2.0]))


def test_ties_tie_in_the_vote_elects_plus_and_zeros_never_agree() -> None:
    # Column 0: +1 and -1 sum to 0 -> elected +, only d1 agrees: 1 / 1. Column 1: d1 is 0 (sign 0,
    # never agrees), d2 = 2 agrees: 2 / 1 (the zero's weight is not in the divisor).
    models = BASE4[:2] + torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    merged = call("ties", BASE4[:2], models, weight=1.0)
    torch.testing.assert_close(merged, BASE4[:2] + torch.tensor([1.0, 2.0]))


def test_ties_rescale_matches_the_l1_norm() -> None:
    # One model: trimmed d1 = [3, 0, 0, -2] has L1 5, the original 3 + 1 + 0.5 + 2 = 6.5, scale 1.3.
    merged = call("ties", BASE4, TIES_MODELS[:1], weight=1.0, density=0.5, rescale=True)
    torch.testing.assert_close(merged, BASE4 + torch.tensor([3.9, 0.0, 0.0, -2.6]))


def test_ties_keeps_at_least_one_entry() -> None:
    # density 0.1 of 4 entries: int(0.4) = 0, but mergekit keeps max(1, .) = 1, the largest |.|.
    merged = call("ties", BASE4, TIES_MODELS[1:2], weight=1.0, density=0.1)
    torch.testing.assert_close(merged, BASE4 + torch.tensor([0.0, -4.0, 0.0, 0.0]))


def test_kept_count_uses_the_exact_density() -> None:
    # density 0.7 of 10 entries keeps int(0.7 * 10) = 7 (mergekit's Python float). Per-model values
    # must reach the method as float64: in float32, 0.7 is 0.69999999 and int(6.9999999) would keep 6.
    delta = torch.arange(1.0, 11.0)
    density = torch.tensor([0.7], dtype=torch.float64)
    merged = get_method("ties").fn(
        torch.zeros(10),
        delta[None],
        weight=torch.ones(1),
        density=density,
        normalize=True,
        rescale=False,
        lambda_=1.0,
        int8_mask=False,
    )
    # The 7 largest survive: 4..10.
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]))


def test_int8_mask_changes_nothing() -> None:
    plain = call("ties", BASE4, TIES_MODELS, weight=[1.0, 2.0, 1.0], density=0.5)
    assert torch.equal(plain, call("ties", BASE4, TIES_MODELS, weight=[1.0, 2.0, 1.0], density=0.5, int8_mask=True))


# Ten entries, by magnitude: 0.1 0.2 0.3 | 0.5 1 1.5 2 3 | 4 5
CRUMBS = [0.1, -5.0, 2.0, -0.3, 1.0, 4.0, -0.2, 3.0, 0.5, -1.5]


def test_breadcrumbs_drops_outliers_and_the_smallest_by_hand() -> None:
    base = torch.zeros(10)
    # density 0.5 keeps 5; gamma 0.2 drops the top 2 (|-5|, |4|); the bottom 10 - 5 - 2 = 3 go too.
    merged = call("breadcrumbs", base, torch.tensor([CRUMBS]), weight=1.0, density=0.5, gamma=0.2)
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.5, -1.5]))


def test_breadcrumbs_keeps_the_density_when_gamma_is_too_large() -> None:
    base = torch.zeros(10)
    # density 0.9 keeps 9; gamma 0.3 would drop 3 on top, but only 10 - 9 = 1 can go: the largest, -5.
    merged = call("breadcrumbs", base, torch.tensor([CRUMBS]), weight=1.0, density=0.9, gamma=0.3)
    expected = torch.tensor(CRUMBS)
    expected[1] = 0.0
    torch.testing.assert_close(merged, expected)
    # density 1 keeps everything, outliers included.
    torch.testing.assert_close(
        call("breadcrumbs", base, torch.tensor([CRUMBS]), weight=1.0, density=1.0, gamma=0.3),
        torch.tensor(CRUMBS),
    )


def test_breadcrumbs_ties_elects_signs_after_dropping() -> None:
    base = torch.zeros(2)
    # density 0.5 of 2 entries keeps 1, gamma 0: the larger one. d1 -> [0, 4]; d2 -> [-3, 0]; d3 -> [0, -1].
    # Column 1: 4 - 1 = 3 elects +, only d1 agrees; no normalize (breadcrumbs default): [-3, 4].
    models = torch.tensor([[1.0, 4.0], [-3.0, 2.0], [0.5, -1.0]])
    merged = call("breadcrumbs_ties", base, models, weight=1.0, density=0.5, gamma=0.0)
    torch.testing.assert_close(merged, torch.tensor([-3.0, 4.0]))


def test_model_stock_t_by_hand() -> None:
    base = torch.tensor([0.5, -0.5])
    # Orthogonal task vectors: cos 0, t = 0: the base.
    torch.testing.assert_close(call("model_stock", base, base + torch.tensor([[1.0, 0.0], [0.0, 1.0]])), base)
    # d1 = [1, 0], d2 = [1, 1]: cos = 1/sqrt(2) = 0.7071068; N = 2: t = 2c / (1 + c) = 0.8284271;
    # mean task vector [1, 0.5] -> base + [0.8284271, 0.4142136]
    merged = call("model_stock", base, base + torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(merged, base + torch.tensor([0.8284271, 0.4142136]))
    # Three task vectors with pairwise cos 1/2: t = 3 * 0.5 / (1 + 2 * 0.5) = 0.75;
    # mean task vector [2/3, 2/3, 2/3] -> base + 0.75 * 2/3 = +0.5 each
    base3 = torch.zeros(3)
    merged = call("model_stock", base3, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    torch.testing.assert_close(merged, torch.full((3,), 0.5))
    # Opposite task vectors with N = 2: 1 + (N-1) cos = 0, singular: the base is kept.
    torch.testing.assert_close(call("model_stock", base, base + torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), base)


def test_model_stock_filter_wise_takes_one_angle_per_row() -> None:
    base = torch.zeros(2, 2)
    models = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [3.0, 0.0]]])
    # Row 0: [1, 0] vs [0, 1], cos 0 -> t 0. Row 1: [2, 0] vs [3, 0], cos 1 -> t = 2/2 = 1, mean [2.5, 0].
    merged = call("model_stock", base, models, filter_wise=True)
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0], [2.5, 0.0]]))
    # Over the whole tensor: cos = (0 + 6) / (sqrt(5) * sqrt(10)) = 0.8485281, t = 2c/(1+c) = 0.9180581;
    # mean [[0.5, 0.5], [2.5, 0]] * t
    merged = call("model_stock", base, models)
    torch.testing.assert_close(merged, 0.9180581 * torch.tensor([[0.5, 0.5], [2.5, 0.0]]))


def test_dare_at_density_one_half_doubles_the_survivors() -> None:
    # Each entry survives with probability 1/2 and is divided by it: kept entries are exactly 2 delta.
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])
    merged = call("dare_linear", torch.zeros(8), delta[None], weight=1.0, density=0.5, seed=3)
    # The mask is the seeded generator's first 8 Bernoulli(1/2) draws.
    mask = torch.bernoulli(torch.full((8,), 0.5), generator=torch.Generator().manual_seed(3))
    assert 0 < mask.sum() < 8
    assert torch.equal(merged, 2 * delta * mask)
    unscaled = call("dare_linear", torch.zeros(8), delta[None], weight=1.0, density=0.5, seed=3, rescale=False)
    assert torch.equal(unscaled, delta * mask)


def test_della_keep_probabilities_rise_with_magnitude_rank() -> None:
    # Within each row, ranks 1..5 normalise to 0, 1/4, 1/2, 3/4, 1; density 0.5, epsilon 0.2 give
    # keep probabilities 0.3, 0.4, 0.5, 0.6, 0.7. 20000 rows estimate each to within ~0.004.
    rows = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]).expand(20000, 5)
    merged = call(
        "della_linear", torch.zeros(20000, 5), rows[None], weight=1.0, density=0.5, epsilon=0.2, rescale=False
    )
    frequency = (merged != 0).double().mean(dim=0)
    torch.testing.assert_close(
        frequency, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7], dtype=torch.float64), atol=0.02, rtol=0
    )


def test_della_divides_each_survivor_by_its_keep_probability() -> None:
    # Ranks 1..5 give keep probabilities 0.3, 0.4, 0.5, 0.6, 0.7 (density 0.5, epsilon 0.2), so survivors
    # become 1/0.3, -2/0.4 = -5, 3/0.5 = 6, -4/0.6 and 5/0.7; the same seed draws the same mask.
    rows = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]).expand(100, 5)
    settings = {"weight": 1.0, "density": 0.5, "epsilon": 0.2, "seed": 5}
    rescaled = call("della_linear", torch.zeros(100, 5), rows[None], **settings)
    unscaled = call("della_linear", torch.zeros(100, 5), rows[None], rescale=False, **settings)
    assert 0 < (unscaled != 0).sum() < unscaled.numel()
    torch.testing.assert_close(rescaled, unscaled / torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]))


def test_della_rejects_probabilities_outside_zero_one() -> None:
    models = torch.randn(1, 10)
    with pytest.raises(EvomergeError, match="epsilon"):
        call("della", torch.zeros(10), models, weight=1.0, density=0.9, epsilon=0.15)
    # density 1 prunes nothing, so any epsilon is fine (as in mergekit).
    torch.testing.assert_close(call("della", torch.zeros(10), models, weight=1.0, density=1.0, epsilon=0.4), models[0])


# ---------------------------------------------------------------------------------------------------
# Random methods: reproducible from the generator, and unbiased.


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_merge_different_seed_different(name: str) -> None:
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(8, 16, generator=generator)
    models = base + torch.randn(2, 8, 16, generator=generator)
    first = call(name, base, models, seed=11, density=0.5)
    torch.manual_seed(0)  # the global generator must not matter
    assert torch.equal(first, call(name, base, models, seed=11, density=0.5))
    assert not torch.equal(first, call(name, base, models, seed=12, density=0.5))


def keep_probability(delta: torch.Tensor, name: str, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's chance of surviving: ``density`` for DARE; for DELLA's MagPrune, ranked along dim 1
    (a 1-D tensor is one row), density - epsilon + 2 epsilon (rank - 1) / (width - 1)."""
    if name.startswith("dare"):
        return torch.full(delta.shape, density, dtype=torch.float64)
    rows = delta if delta.ndim >= 2 else delta.reshape(1, -1)
    width = rows.shape[1]
    if width == 1:
        return torch.full(delta.shape, density, dtype=torch.float64)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    return (density - epsilon + 2 * epsilon * ranks / (width - 1)).reshape(delta.shape)


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37,), (6, 9), (4, 5, 3), (7, 1)])
def test_rescale_divides_each_survivor_by_its_keep_probability(
    name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """One model at weight 1 on a zero base: the merge is the sparsified task vector itself. float16
    draws in float32 on CPU, bfloat16 in bfloat16 (rounding the probabilities, hence bf16 tolerances)."""
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    settings = {"weight": 1.0, "density": 0.25 if name == "dare_linear" else 0.5, "epsilon": 0.25, "seed": 6}
    zero = torch.zeros(shape, dtype=dtype)
    rescaled = call(name, zero, delta[None], **settings)
    unscaled = call(name, zero, delta[None], rescale=False, **settings)
    kept = unscaled != 0
    assert kept.any() and torch.equal(kept, rescaled != 0)
    expected = unscaled.double() / keep_probability(delta, name, settings["density"], settings["epsilon"])
    torch.testing.assert_close(rescaled, expected.to(dtype))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_rescale_divides_each_model_by_its_own_density(name: str) -> None:
    """DARE's masks do not depend on the values, so rescaling the survivors by 1 / density_k is the same
    as merging, unrescaled, task vectors already divided by density_k (sign election included)."""
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(16, 24, generator=generator)
    deltas = torch.randn(3, 16, 24, generator=generator)
    density = [0.3, 0.6, 0.9]
    settings = {"weight": [0.6, -0.3, 0.9], "density": density, "normalize": True, "seed": 7}
    rescaled = call(name, base, base + deltas, **settings)
    divided = base + deltas / torch.tensor(density)[:, None, None]
    torch.testing.assert_close(rescaled, call(name, base, divided, rescale=False, **settings))


@pytest.mark.parametrize("name", RANDOM)
def test_mean_over_draws_is_the_unpruned_merge(name: str) -> None:
    """Dividing each survivor by its keep probability p makes every sparsified entry unbiased, so the
    mean over draws converges to the unpruned merge, for DELLA too (mergekit's L1-norm rescale leans
    toward large-magnitude entries there, by up to about epsilon / density). Entry i of one merge has
    variance sum_k w_k^2 delta_ki^2 (1 - p_ki) / p_ki, so the mean of D draws misses the unpruned merge
    by about sqrt(sum_i variance_i / D). TIES variants merge one model, where the sign election keeps
    every nonzero entry."""
    generator = torch.Generator().manual_seed(8)
    count = 1 if name in {"dare_ties", "della"} else 2
    base = torch.randn(2000, generator=generator)
    models = base + torch.randn(count, 2000, generator=generator)
    weights = torch.tensor([0.6, 0.3][:count])
    deltas = models - base
    draws = 400
    merged = torch.stack(
        [
            call(name, base, models, seed=s, weight=weights.tolist(), density=0.5, epsilon=0.3, normalize=False)
            for s in range(draws)
        ]
    )
    p = torch.stack([keep_probability(delta, name, 0.5, 0.3) for delta in deltas])
    variance = (weights[:, None].double() ** 2 * deltas.double() ** 2 * (1 - p) / p).sum(dim=0)
    noise = (variance.sum() / draws).sqrt()
    error = (merged.double().mean(dim=0) - (base + weights @ deltas).double()).norm()
    # The squared error sums 2000 independent terms, so it stays within a few percent of noise^2.
    assert error < 1.25 * noise, f"{error:.3g} vs noise {noise:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dare_keeps_each_entry_with_exactly_its_density(dtype: torch.dtype) -> None:
    """DARE's mask is mergekit's ``torch.bernoulli(torch.full_like(delta, density))`` draw for draw, drawn
    live or from the draws the in-place path keeps, and survivors are divided by that density (in the
    draw dtype). In float32, 0.3 and 0.7 lie 51 and 205 in 2**24 below the next multiple of 2**-16: a
    keep probability rounded up to one would keep about 15 more entries in these million."""
    method = get_method("dare_linear")
    delta = torch.ones(1_000_000, dtype=dtype)
    deltas = torch.stack([delta, delta])
    kwargs = {
        "weight": torch.tensor([1.0, 1.0], dtype=torch.float64),
        "density": torch.tensor([0.3, 0.7], dtype=torch.float64),
        "normalize": False,
        "lambda_": 1.0,
        "int8_mask": False,
    }
    generator = torch.Generator().manual_seed(5)
    masks = [torch.bernoulli(torch.full_like(delta, p), generator=generator) for p in (0.3, 0.7)]
    zero = torch.zeros_like(delta)
    live = method.merge(zero, deltas, rescale=False, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(live, masks[0] + masks[1])
    draws = method.precompute(zero, deltas, generator=torch.Generator().manual_seed(5))
    if dtype != torch.float64:  # which keeps no draws: it draws live (see bernoulli)
        kept = method.merge(zero, deltas, rescale=False, generator=torch.Generator(), precomputed=draws, **kwargs)
        assert torch.equal(kept, live)
    rescaled = method.merge(zero, deltas, rescale=True, generator=torch.Generator().manual_seed(5), **kwargs)
    divisors = [torch.tensor(p, dtype=dtype) for p in (0.3, 0.7)]
    assert torch.equal(rescaled, masks[0] / divisors[0] + masks[1] / divisors[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bernoulli_draws_what_torch_bernoulli_draws(dtype: torch.dtype) -> None:
    """The masks DARE and DELLA draw are torch.bernoulli's (hence mergekit's) entry for entry, and the
    generator is left where torch.bernoulli leaves it, for one probability and for one per entry."""
    from evomerge.methods.sparsify import bernoulli

    per_entry = torch.rand(300, 70, generator=torch.Generator().manual_seed(9)).to(dtype)
    for probability in [torch.tensor(p, dtype=dtype) for p in (1e-8, 0.1, 0.4, 0.6, 0.77, 0.999)] + [per_entry]:
        ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        drawn = bernoulli(probability, torch.Size((300, 70)), ours)
        assert drawn.dtype == dtype
        assert torch.equal(drawn, torch.bernoulli(probability.expand(300, 70), generator=theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_with_kept_draws_merges_as_dare_drawing_live(name: str, dtype: torch.dtype) -> None:
    """On CPU, DARE draws first (the in-place path once per seed, as the method's precompute; a single
    merge, per call) and merges in blocks of 2**17 entries; both are the whole-tensor merge with masks
    drawn model after model, bit for bit, here over three blocks, with a model kept whole (density 1,
    no draw) between two that drop. Float64 (and a GPU) keep nothing and draw live."""
    method = get_method(name)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(300_000, generator=generator).to(dtype)
    deltas = (torch.randn(3, 300_000, generator=generator) * 0.01).to(dtype)
    kwargs = {
        "weight": torch.tensor([0.6, 0.3, 0.9], dtype=torch.float64),
        "density": torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64),
        "normalize": True,
        "rescale": True,
        "lambda_": 1.0,
        "int8_mask": False,
    }
    from evomerge.methods.sparsify import random_drop
    from evomerge.methods.task_arithmetic import merge_task_vectors

    # The reference: each model's mask drawn in turn from one generator, the whole tensor at once.
    generator, dropped = torch.Generator().manual_seed(11), torch.empty_like(deltas)
    for delta, keep, drop in zip(deltas, kwargs["density"].tolist(), dropped, strict=True):
        random_drop(delta, keep, drop, rescale=True, generator=generator)
    expected = merge_task_vectors(
        base, dropped, kwargs["weight"], normalize=True, lambda_=1.0, sign_consensus=name == "dare_ties"
    )
    live = method.merge(base, deltas.clone(), generator=torch.Generator().manual_seed(11), **kwargs)
    draws = method.precompute(base, deltas, generator=torch.Generator().manual_seed(11))
    assert draws.shape == deltas.shape and draws.dtype == torch.float32  # each model's 24-bit words
    assert draws.nbytes == base.numel() * method.precompute_bytes(base.device, dtype, 3)  # what memory.py counts
    kept = method.merge(base, deltas.clone(), generator=torch.Generator(), precomputed=draws, **kwargs)
    assert torch.equal(live, expected) and torch.equal(kept, expected)
    assert not torch.equal(live, base)
    assert method.precompute(base.double(), deltas.double(), generator=torch.Generator()) is None


def test_kth_largest_is_what_kthvalue_finds() -> None:
    """The radix-narrowed selection TIES trims with returns kthvalue's value for every k, with ties,
    zeros, infinities and values that share their top 16 bits."""
    from evomerge.methods.sparsify import kth_largest

    generator = torch.Generator().manual_seed(6)
    magnitudes = torch.randn(5000, generator=generator).abs()
    magnitudes[:500] = 0.0
    magnitudes[500:900] = 0.25
    magnitudes[900:903] = float("inf")
    magnitudes[903:1400] = 1.0 + torch.arange(497) * 2**-20  # one top-16-bit bucket
    for key in (magnitudes, magnitudes[torch.randperm(5000, generator=generator)]):
        for k in (1, 2, 3, 4, 600, 1000, 2500, 4100, 4500, 4501, 4999, 5000):
            assert kth_largest(key, k) == torch.kthvalue(key, key.numel() - k + 1).values, k
    assert kth_largest(magnitudes.double(), 7) == torch.kthvalue(magnitudes.double(), 5000 - 7 + 1).values


def test_compiled_kernels_run_only_where_they_were_checked_bit_equal() -> None:
    from evomerge.methods import fused
    from evomerge.methods.fused import checked_bit_equal

    assert checked_bit_equal("cpu", torch.float32, "2.13.0+cpu") and checked_bit_equal("cpu", torch.bfloat16, "2.14.1")
    assert not checked_bit_equal("cpu", torch.bfloat16, "2.11.0+cu130")  # 1-ulp differences seen there
    assert checked_bit_equal("cuda", torch.bfloat16, "2.11.0+cu130")
    assert not checked_bit_equal("cuda", torch.float32, "2.11.0+cu130")  # results/gpu_check_cuda.md
    assert not fused.worth_fusing(torch.empty(1 << 16, device="meta"))  # a device never checked
    here = checked_bit_equal("cpu", torch.float32, torch.__version__)
    assert fused.worth_fusing(torch.empty(1 << 16)) == here and not fused.worth_fusing(torch.empty(16))
