"""The search's structured config: Hydra composes `conf/`, these dataclasses type-check every key.

A wrong type or an unknown key is rejected by OmegaConf with the key's full name; ``check_config``
adds the range checks types cannot express. Each group in `conf/` maps to one field here and to one
package of the library (`conf/optimizer/cmaes.yaml` ↔ `evomerge/optimizer/cmaes.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from evomerge.dtypes import DTYPE_NAMES
from evomerge.errors import EvomergeError

# The configs ship inside the package, so `pip install .` gives a working `evomerge search` from any
# folder; the repository's top-level conf/ is a link to this folder, for readers.
CONF_DIR = Path(__file__).resolve().parent / "conf"


# evomerge/dtypes.py names them; auto is resolved at a run's start (resolve_auto).
DType = Enum("DType", [(name, name) for name in ("auto", *DTYPE_NAMES)], type=str)


@dataclass
class ModelsConfig:
    base: str = MISSING
    experts: list[str] = MISSING
    # Vocabularies that differ (an added token): base, union or a model's path, as in mergekit; null: all alike
    tokenizer_source: str | None = None


@dataclass
class MethodConfig:
    name: str = MISSING
    parameters: dict[str, Any] = field(default_factory=dict)  # fixed knobs of the whole merge


GENOME_KINDS = ("ps", "dfs", "ps_dfs")


@dataclass
class GenomeConfig:
    kind: str = "ps"  # ps (conf/genome/ps.yaml), dfs or ps_dfs (conf/genome/dfs.yaml, ps_dfs.yaml)
    # parameter space (evomerge/genome/ps.py)
    layer_groups: int | None = 1  # None: one group per layer, whatever the model's depth
    filters: list[str] = field(default_factory=list)
    params: list[str] | None = None  # None: every numeric knob the method declares
    ranges: dict[str, list[float]] = field(default_factory=dict)
    # data-flow space (evomerge/genome/dfs.py)
    sources: list[str] | None = None  # None: models.base, then models.experts
    embedding_source: int = 0  # index into the sources (ps_dfs: 0 is the PS merge)
    repeats: int = 3
    max_path_length: int | None = None
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    search_diagonal: bool = False
    scales_per_position: bool = False
    start: str | None = None  # None: CMA-ES starts at the box's centre; embedding_source: at that source's path
    ps_source: str | None = None  # ps_dfs: a recipe file, or a run folder whose best candidate is taken


@dataclass
class TasksConfig:
    names: list[str] = MISSING
    include_path: str | None = None
    limit: int | None = None
    sample_seed: int = 0
    # lm-eval's own options, under its names (evomerge/evaluate/lm_eval_scorer.py, TaskSet, says what each does)
    num_fewshot: Any = None  # an int for every task, or {task or group name: int}
    batch_size: Any = 32  # a positive int, or "auto"
    acknowledge_test_split: bool = False
    apply_chat_template: Any = False  # true, false, or the name of one of the tokenizer's templates
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    confirm_run_unsafe_code: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    name: str = MISSING
    terms: dict[str, float] = MISSING  # "task/metric" -> weight


@dataclass
class BudgetConfig:
    evaluations: int | None = 100
    wall_time_s: float | None = None
    fail_fast: int | None = 3  # stop if the first N candidates scored all raise one error; null: never


@dataclass
class RacingConfig:
    """Paired racing (evomerge/search/racing.py): score a generation on shared items in doubling rounds."""

    enabled: bool = False
    first_round: int = 16  # items in round 1; each later round doubles
    delta: float = 0.05  # all the race's conclusions hold together with probability >= 1 - delta


@dataclass
class EstimateConfig:
    """Estimated fitness (evomerge/search/estimate.py): candidates scored on a few anchor items."""

    enabled: bool = False
    # irt: anchors picked by an item-response model fitted on the endpoints; mean: a random sample of
    # the items, drawn again each generation, its mean the estimate (no endpoints scored, no fit)
    estimator: str = "irt"
    anchors: int = 100  # anchor items each candidate is scored on (tinyBenchmarks: 100 per task)
    dims: int = 2  # the IRT model's ability dimensions
    seed: int = 0  # of the fit and the anchor clustering (irt), or, with the run's seed, of the samples (mean)
    refit: bool = True  # fit again after each generation on its best (scored on every item) too
    # generations scored on every item first (and fitted on): endpoints that all fail the objective teach
    # the fit nothing about its items (results/fitness_cost_smollm.md); null: 1 for irt, 0 for mean
    warmup: int | None = None
    # score a generation's best estimate on every item only where its estimate (calibrated by the last
    # verified error) is within this of the best accuracy so far; null: always (results/fitness_cost_*.md)
    verify_within: float | None = None


class ExecutorKind(str, Enum):
    serial = "serial"
    ray = "ray"


@dataclass
class ExecutorConfig:
    kind: ExecutorKind = ExecutorKind.serial
    threads: int | None = None  # torch threads per worker; null: torch's default
    tier: str = "auto"  # where a worker keeps the sources: auto, resident, host or disk (materialize/in_place.py)
    gpus_per_worker: int = 1  # GPUs one worker's model spans, placed by executor/placement.py
    reserve_bytes: int | None = None  # device memory kept for the KV cache and activations; null: derived
    # The Ray pool's knobs (conf/executor/ray.yaml says what each does):
    num_workers: int | None = None
    address: str | None = None
    max_tries: int = 3
    timeout_s: float | None = None
    resources: Any = None  # {name: amount}: custom Ray resources each worker needs; null: none


@dataclass
class ToyConfig:
    size: str = "full"
    seed: int = 0


@dataclass
class SearchConfig:
    seed: int = 0
    run_dir: str = MISSING
    device: str = "auto"  # auto: cuda where the workers have a GPU, else cpu (resolve_auto)
    dtype: DType = DType.auto  # auto: bfloat16 on cuda, float32 on cpu
    models: ModelsConfig = field(default_factory=ModelsConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    genome: GenomeConfig = field(default_factory=GenomeConfig)
    optimizer: dict[str, Any] = field(default_factory=dict)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    objectives: list[ObjectiveConfig] = MISSING
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    in_flight: int | None = None  # None: generations (loop.py); N: asynchronous, N candidates out (window.py)
    racing: RacingConfig = field(default_factory=RacingConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    report_to: list[str] = field(default_factory=list)  # trackers, as transformers names them (evomerge/track)
    toy: ToyConfig = field(default_factory=ToyConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="search_schema", node=SearchConfig)
    if not OmegaConf.has_resolver("toy_world"):
        OmegaConf.register_new_resolver("toy_world", toy_world_path, use_cache=True)
    if not OmegaConf.has_resolver("smol_world"):
        OmegaConf.register_new_resolver("smol_world", smol_world_path, use_cache=True)


def toy_world_path(size: str, seed: int, what: str) -> str:
    """``${toy_world:full,0,base}``: a path in the (cached) toy world, built on first use."""
    from evomerge.toy import build_world

    world = build_world(size=size, seed=int(seed))
    paths = {"base": world.base, "tasks": world.tasks_dir, **world.experts}
    return str(paths[what])


def smol_world_path(size: str, seed: int, what: str) -> str:
    """``${smol_world:full,0,base}``: a path in the (cached) SmolLM2 world, built on first use (size tiny
    is the smoke build, as in ``evomerge toy build --world smollm``)."""
    from evomerge.toy.smollm import build_smol_world

    world = build_smol_world(size="smoke" if size == "tiny" else size, seed=int(seed))
    paths = {"base": world.base, "tasks": world.tasks_dir, **world.experts}
    return str(paths[what])


def resolve_auto(cfg: DictConfig) -> None:
    """Replace ``device=auto`` and ``dtype=auto`` by what they mean where this run starts, and say so: CUDA
    and bfloat16 where the workers have a GPU (at 7B, float32 sources are ~145 GB), else the CPU and float32
    (the toy demo; bfloat16 matmuls are slow on most CPUs). Done once, at the run's start: its config.yaml
    records the result, so a resume or an export elsewhere (a laptop, a node without a GPU) uses the same."""
    chosen = []
    if cfg.device == "auto":
        has_gpu, where = _workers_have_gpu(cfg.executor)
        cfg.device = "cuda" if has_gpu else "cpu"
        chosen.append(f"device={cfg.device} ({where})")
    if str(getattr(cfg.dtype, "value", cfg.dtype)) == "auto":
        cfg.dtype = "bfloat16" if str(cfg.device).startswith("cuda") else "float32"
        chosen.append(f"dtype={getattr(cfg.dtype, 'value', cfg.dtype)} (on {cfg.device})")
    if chosen:
        print(f"evomerge: {' and '.join(chosen)}; set device= and dtype= to choose otherwise", flush=True)


def _workers_have_gpu(executor: DictConfig) -> tuple[bool, str]:
    """Whether the workers will have a GPU, and how that is known: a Ray cluster that the driver joins
    (``executor.address``) is asked, since its head node, where the driver runs, may have none."""
    if executor.kind == "ray" and executor.address is not None:
        from evomerge.executor.ray_pool import cluster_gpus  # ray only where it is used

        gpus = cluster_gpus(executor.address)
        return gpus > 0, f"the Ray cluster at {executor.address} has {gpus} GPU(s)"
    import torch  # here, so that reading a config does not import torch

    available = torch.cuda.is_available()
    return available, "CUDA is available here" if available else "no CUDA device here"


def check_config(cfg: DictConfig) -> None:
    """Range checks the types cannot express; each error names the key, the value and what is allowed."""

    def bad(key: str, value: object, allowed: str) -> EvomergeError:
        return EvomergeError(f"config value {key}={value} is not allowed", f"use {allowed}")

    budget = cfg.budget
    if budget.evaluations is None and budget.wall_time_s is None:
        raise bad("budget", "no limit", "budget.evaluations=N and/or budget.wall_time_s=SECONDS")
    if budget.evaluations is not None and budget.evaluations < 1:
        raise bad("budget.evaluations", budget.evaluations, "a positive number of evaluations")
    if budget.fail_fast is not None and budget.fail_fast < 1:
        raise bad("budget.fail_fast", budget.fail_fast, "a positive number of candidates, or null for no check")
    if budget.wall_time_s is not None and budget.wall_time_s <= 0:
        raise bad("budget.wall_time_s", budget.wall_time_s, "a positive number of seconds")
    if not cfg.objectives:
        raise bad("objectives", "[]", "at least one objective with terms {task/metric: weight}")
    for i, objective in enumerate(cfg.objectives):
        if not objective.terms:
            raise bad(f"objectives[{i}].terms", "{}", "at least one 'task/metric: weight' term")
    if not cfg.models.experts:
        raise bad("models.experts", "[]", "a list of at least one model folder")
    if cfg.tasks.limit is not None and cfg.tasks.limit < 1:
        raise bad("tasks.limit", cfg.tasks.limit, "a positive number of items per task, or null for all")
    racing = cfg.racing
    if racing.enabled:
        if racing.first_round < 1:
            raise bad("racing.first_round", racing.first_round, "a positive number of items")
        if not 0 < racing.delta < 1:
            raise bad("racing.delta", racing.delta, "a probability between 0 and 1, e.g. 0.05")
        if len(cfg.objectives) != 1 or len(cfg.objectives[0].terms) != 1 or cfg.in_flight is not None:
            raise EvomergeError(
                "racing.enabled races one per-item metric of one task, over whole generations; this run has "
                f"{len(cfg.objectives)} objective(s), {len(cfg.objectives[0].terms)} term(s), in_flight={cfg.in_flight}",
                "use one objective with one 'task/metric' term (e.g. toy_combined/acc) and in_flight=null, or "
                "racing.enabled=false",
            )
    estimate = cfg.estimate
    if estimate.enabled:
        if estimate.anchors < 1:
            raise bad("estimate.anchors", estimate.anchors, "a positive number of anchor items, e.g. 100")
        if estimate.dims < 1:
            raise bad("estimate.dims", estimate.dims, "a positive number of ability dimensions, e.g. 2")
        if estimate.estimator not in ("irt", "mean"):
            raise bad(
                "estimate.estimator", estimate.estimator, "irt (an item-response model) or mean (a random sample)"
            )
        if estimate.warmup is not None and estimate.warmup < 0:
            raise bad("estimate.warmup", estimate.warmup, "a number of generations >= 0 scored on every item, e.g. 1")
        if estimate.verify_within is not None and not 0 <= estimate.verify_within <= 1:
            raise bad(
                "estimate.verify_within",
                estimate.verify_within,
                "null (score every generation's best estimate on every item) or an accuracy margin in [0, 1], e.g. 0.05",
            )
        if racing.enabled or len(cfg.objectives) != 1 or len(cfg.objectives[0].terms) != 1 or cfg.in_flight is not None:
            raise EvomergeError(
                "estimate.enabled estimates one per-item metric of one task, over whole generations, without "
                f"racing; this run has {len(cfg.objectives)} objective(s), {len(cfg.objectives[0].terms)} term(s), "
                f"in_flight={cfg.in_flight}, racing.enabled={racing.enabled}",
                "use one objective with one 'task/metric' term (e.g. toy_combined/acc), in_flight=null and "
                "racing.enabled=false, or estimate.enabled=false",
            )
    if cfg.in_flight is not None and cfg.in_flight < 1:
        raise bad("in_flight", cfg.in_flight, "a positive number of candidates in flight, or null for generations")
    batch_size = cfg.tasks.batch_size
    if batch_size != "auto" and not (
        isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
    ):
        raise bad("tasks.batch_size", batch_size, "a positive batch size, or auto")
    fewshot = cfg.tasks.num_fewshot
    counts = fewshot.values() if isinstance(fewshot, DictConfig) else [] if fewshot is None else [fewshot]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise bad("tasks.num_fewshot", fewshot, "null, a count >= 0 for every task, or {task or group name: count}")
    if not isinstance(cfg.tasks.apply_chat_template, (bool, str)):
        raise bad("tasks.apply_chat_template", cfg.tasks.apply_chat_template, "true, false or a template's name")
    _check_executor(cfg, bad)
    if cfg.genome.kind not in GENOME_KINDS:
        raise bad("genome.kind", cfg.genome.kind, "ps (parameter space), dfs (data flow) or ps_dfs (both)")
    if cfg.genome.kind == "ps_dfs" and not cfg.genome.ps_source:
        raise bad(
            "genome.ps_source", None, "a PS recipe file or a finished PS run folder, e.g. genome.ps_source=runs/ps"
        )
    if cfg.genome.max_path_length is not None and cfg.genome.max_path_length < 1:
        raise bad("genome.max_path_length", cfg.genome.max_path_length, "a positive number of layers, or null")
    if cfg.genome.start not in (None, "embedding_source") or (cfg.genome.start and cfg.genome.kind == "ps"):
        raise bad("genome.start", cfg.genome.start, "null, or embedding_source with genome=dfs or genome=ps_dfs")


def _check_executor(cfg: DictConfig, bad) -> None:
    executor = cfg.executor
    if executor.tier not in ("auto", "resident", "host", "disk"):
        raise bad("executor.tier", executor.tier, "auto, resident, host or disk")
    if executor.gpus_per_worker < 1:
        raise bad("executor.gpus_per_worker", executor.gpus_per_worker, "1 or more")
    if executor.reserve_bytes is not None and executor.reserve_bytes < 0:
        raise bad("executor.reserve_bytes", executor.reserve_bytes, "a number of bytes >= 0, or null")
    if executor.threads is not None and executor.threads < 1:
        raise bad("executor.threads", executor.threads, "a positive number of torch threads per worker, or null")
    if executor.kind != "ray":
        for key in ("num_workers", "address", "timeout_s"):
            if executor[key] is not None:
                raise bad(f"executor.{key}", executor[key], "executor=ray: the serial executor runs in this process")
        if executor.resources:
            raise bad(
                "executor.resources", executor.resources, "executor=ray: the serial executor runs in this process"
            )
        return
    resources = executor.resources
    if resources is not None and not isinstance(resources, DictConfig):
        raise bad("executor.resources", resources, "{name: amount} of custom Ray resources per worker, or null")
    for name, need in (resources or {}).items():
        if isinstance(need, bool) or not isinstance(need, (int, float)) or need <= 0:
            raise bad(f"executor.resources.{name}", need, "a positive amount of a custom Ray resource per worker")
    if executor.threads is None:
        raise bad("executor.threads", None, "a positive number of torch threads (and Ray CPUs) per worker")
    if executor.num_workers is not None and executor.num_workers < 1:
        raise bad("executor.num_workers", executor.num_workers, "a positive number of workers, or null")
    if executor.max_tries < 1:
        raise bad("executor.max_tries", executor.max_tries, "a positive number of tries per candidate")
    if executor.timeout_s is not None and executor.timeout_s <= 0:
        raise bad("executor.timeout_s", executor.timeout_s, "a positive number of seconds, or null")
    if str(cfg.device).startswith("cuda:"):
        raise bad("device", cfg.device, "device=cuda: Ray gives each worker one GPU of its own")
