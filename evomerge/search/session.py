"""Set up a search from its config, drive it, and clean up: the thin layer between the CLI and the loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from evomerge.config import SearchConfig, check_config, resolve_auto
from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import TaskSet
from evomerge.executor.serial import SerialExecutor
from evomerge.executor.worker import WorkerSpec
from evomerge.genome.contract import Genome
from evomerge.genome.dfs import DataFlowGenome
from evomerge.genome.ps import ParameterSpaceGenome
from evomerge.genome.ps_dfs import merge_ps_source, ps_source_folder, reference_model
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.locate import resolve_model
from evomerge.materialize.dataflow import open_sources
from evomerge.recipe.recipe import Recipe, load_recipe
from evomerge.search.estimate import FIT_FILE, Estimate, Fit, SampleMean, describe_error, fitted_estimator
from evomerge.search.heartbeat import Heartbeat
from evomerge.search.loop import Budget, run_search
from evomerge.search.plots import Plots
from evomerge.search.racing import Race
from evomerge.search.run_folder import RunFolder
from evomerge.search.state import SearchState
from evomerge.search.status import append_worker
from evomerge.search.window import run_window_search
from evomerge.track import check_report_to
from evomerge.track.reporting import Reporting

if TYPE_CHECKING:
    from evomerge.executor.ray_pool import RayExecutor


def start(cfg: DictConfig, run_dir: Path) -> SearchState:
    """A new run in ``run_dir`` (refused if that folder already holds a run: resume it instead)."""
    check_config(cfg)
    check_report_to(list(cfg.report_to))
    resolve_auto(cfg)  # recorded in config.yaml below: a resume and an export use the same
    pin_models(cfg)
    build_genome(cfg, template_recipe(cfg), run_dir)  # every config error surfaces before the run folder is made
    run = RunFolder(run_dir)
    if run.config_path.exists():
        raise EvomergeError(
            f"'{run_dir}' already holds a run", f"continue it with `evomerge resume {run_dir}` or pick a new run_dir"
        )
    run.lock()
    run.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    return _drive(OmegaConf.load(run.config_path), run)


def pin_models(cfg: DictConfig) -> None:
    """Replace each hub ID among the models by ``org/name@<commit>`` (local folders stay as given), so the
    run's config, its log, a resume and an export all read the weights this run started with."""
    cfg.models.base = resolve_model(cfg.models.base).pinned
    cfg.models.experts = [resolve_model(expert).pinned for expert in cfg.models.experts]
    if cfg.genome.get("sources"):
        cfg.genome.sources = [resolve_model(source).pinned for source in cfg.genome.sources]


def resume(run_dir: Path, overrides: list[str], *, force: bool) -> SearchState:
    """Continue a run from its checkpoint; a changed config is refused (with the diff) unless forced."""
    run = RunFolder(run_dir)
    if not run.config_path.exists():
        raise EvomergeError(f"'{run_dir}' holds no evomerge run (no config.yaml)", "check the path")
    saved = saved_config(run)
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides)) if overrides else saved
    resolve_auto(cfg)  # an override device=auto resolves here, and is compared as what it resolved to
    diff = _diff(OmegaConf.to_container(saved), OmegaConf.to_container(cfg))
    if diff and not force:
        raise EvomergeError(
            "resuming with a changed config would not continue the same search: " + "; ".join(diff),
            "resume without overrides, or pass --force to continue with the new values",
        )
    check_config(cfg)
    check_report_to(list(cfg.report_to))
    run.lock()
    if diff:
        run.write_config(OmegaConf.to_yaml(cfg))
    return _drive(cfg, run)


def saved_config(run: RunFolder) -> DictConfig:
    """The run's config.yaml, with the settings evomerge gained since it was written (``estimate``, say)
    at their defaults, which keep the old behaviour: an older run folder resumes instead of failing on a
    missing key."""
    saved = OmegaConf.load(run.config_path)
    return OmegaConf.merge(OmegaConf.to_container(OmegaConf.structured(SearchConfig)), saved)


def template_recipe(cfg: DictConfig) -> Recipe:
    """The recipe every candidate shares; the genome fills in the searched knobs."""
    return Recipe.from_plain(
        {
            "method": cfg.method.name,
            "base": cfg.models.base,
            "models": [{"model": path} for path in cfg.models.experts],
            "tokenizer_source": cfg.models.tokenizer_source,
            "parameters": OmegaConf.to_container(cfg.method.parameters),
            "dtype": str(cfg.dtype.value if hasattr(cfg.dtype, "value") else cfg.dtype),
            "seed": cfg.seed,
        },
        where="config (models/method)",
    )


def build_genome(cfg: DictConfig, template: Recipe, run_dir: Path) -> Genome:
    genome = cfg.genome
    if genome.kind != "ps":
        return _dataflow_genome(cfg, run_dir)
    num_layers = Checkpoint.open(cfg.models.base).num_layers
    return ParameterSpaceGenome(
        template=template,
        num_layers=num_layers,
        layer_groups=num_layers if genome.layer_groups is None else genome.layer_groups,
        filters=list(genome.filters),
        params=None if genome.params is None else list(genome.params),
        ranges={k: list(v) for k, v in genome.ranges.items()},
    )


def _dataflow_genome(cfg: DictConfig, run_dir: Path) -> DataFlowGenome:
    """dfs: paths through ``genome.sources`` (default: the base, then the experts); ps_dfs: the same with
    the PS merge (in the run folder once merged) as source 0. Configs are read, and checked to fit
    together, before anything is merged: until then the PS merge has its reference model's config."""
    genome = cfg.genome
    sources = list(genome.sources) if genome.sources is not None else [cfg.models.base, *cfg.models.experts]
    checked = list(sources)
    if genome.kind == "ps_dfs":
        merged = ps_source_folder(run_dir)
        sources.insert(0, str(merged))
        checked.insert(0, str(merged) if merged.exists() else reference_model(ps_recipe(genome.ps_source)))
    return DataFlowGenome(
        sources=sources,
        layer_counts=[checkpoint.num_layers for checkpoint in open_sources(checked)],
        embedding_source=genome.embedding_source,
        repeats=genome.repeats,
        max_path_length=genome.max_path_length,
        scale_range=list(genome.scale_range),
        search_diagonal=genome.search_diagonal,
        scales_per_position=genome.scales_per_position,
        start=genome.start,
        dtype=str(getattr(cfg.dtype, "value", cfg.dtype)),  # an enum when composed, a string when reloaded
    )


def ps_recipe(ps_source: str | Path) -> Recipe:
    """The PS recipe named by ``genome.ps_source``: a recipe file, or a run folder's best candidate."""
    path = Path(ps_source)
    if path.is_file():
        return load_recipe(path)
    state = RunFolder(path).load_checkpoint() if path.is_dir() else None
    if state is None or state.best is None or state.best.recipe.get("kind") is not None:
        raise EvomergeError(
            f"genome.ps_source '{path}' is neither a recipe file nor a run folder whose best candidate is a PS merge",
            "point it at a PS recipe (e.g. an exported model's evomerge_recipe.yaml) or at a finished genome=ps run",
        )
    return Recipe.from_plain(state.best.recipe, where=f"best candidate of {path}")


def task_set(cfg: DictConfig) -> TaskSet:
    """The scorer's task settings: the config's ``tasks`` node, field for field (names as a tuple)."""
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True)
    return TaskSet(**{**tasks, "names": tuple(tasks["names"])})


def _drive(cfg: DictConfig, run: RunFolder) -> SearchState:
    watchers = [Heartbeat(run.path)]  # from the start: loading the workers can take minutes
    try:
        template = template_recipe(cfg)
        genome = build_genome(cfg, template, run.path)
        if cfg.genome.kind == "ps_dfs":
            merge_ps_source(ps_recipe(cfg.genome.ps_source), run.path, device=cfg.device)
        objectives = [{"name": o.name, "terms": dict(o.terms)} for o in cfg.objectives]
        searched = template.method if cfg.genome.kind == "ps" else f"{cfg.genome.kind} paths"
        print(f"evomerge: {genome.dimension}-dimensional genome over {searched} ({len(objectives)} objective(s))")
        optimizer = _instantiate_optimizer(cfg, genome, len(objectives), run.path)
        if cfg.in_flight is not None and not optimizer.asks_one_at_a_time:
            raise EvomergeError(
                f"in_flight={cfg.in_flight} asks one candidate at a time, which {type(optimizer).__name__} cannot: "
                "it updates on whole generations",
                "use optimizer=tpe, optimizer=nsga2 or optimizer=random, or in_flight=null",
            )
        # Workers validate the recipe family on a complete candidate: the centre of the box.
        center = genome.to_recipe([0.5] * genome.dimension)
        spec = WorkerSpec(
            template=center,
            tasks=task_set(cfg),
            device=cfg.device,
            dtype=str(cfg.dtype),
            tier=cfg.executor.tier,
            gpus_per_worker=cfg.executor.gpus_per_worker,
            reserve_bytes=cfg.executor.reserve_bytes,
        )
        metric = next(iter(objectives[0]["terms"]))
        executor = build_executor(cfg.executor, spec, on_worker=lambda started: append_worker(run.path, started))
        if cfg.estimate.enabled:
            try:
                fit = _estimator(cfg, run.path, template, metric, executor)
            except BaseException:
                executor.close()
                raise
        budget = Budget(
            evaluations=cfg.budget.evaluations, wall_time_s=cfg.budget.wall_time_s, fail_fast=cfg.budget.fail_fast
        )
        evaluate = executor.evaluate
        if cfg.estimate.enabled:
            evaluate = Estimate(
                score_items=executor.evaluate, metric=metric, fit=fit, verify_within=cfg.estimate.verify_within
            )
        if cfg.racing.enabled:
            evaluate = Race(
                score_items=executor.evaluate,
                metric=metric,
                first_round=cfg.racing.first_round,
                delta=cfg.racing.delta,
                selected=optimizer.selected_count(),
                seed=cfg.seed,
                should_prune=optimizer.should_prune if getattr(optimizer, "prunes", False) else None,
            )
        elif getattr(optimizer, "prunes", False):
            raise EvomergeError(
                "optimizer.pruner prunes between racing's rounds of items, and racing is off",
                "set racing.enabled=true, or optimizer.pruner=null",
            )
        search = {"run": run, "genome": genome, "optimizer": optimizer, "evaluate": evaluate}
        names = [o["name"] for o in objectives]
        watchers.append(Plots(run, names))  # before the trackers: the run's end hands them the plots
        if cfg.report_to:
            config = OmegaConf.to_container(OmegaConf.load(run.config_path))  # the resolved config, as written
            watchers.append(Reporting(names=list(cfg.report_to), run=run, config=config, objectives=names))
        search |= {"objectives": objectives, "budget": budget, "watchers": watchers}
        try:
            if cfg.in_flight is None:
                state = run_search(**search)
            else:
                state = run_window_search(**search, in_flight=cfg.in_flight)
        finally:
            executor.close()
        optimizer.close()
        if cfg.estimate.enabled and (line := describe_error(run.read_evaluations(), metric)) is not None:
            print(f"evomerge: {line}")
        return state
    finally:
        for watcher in watchers:
            watcher.close()
        run.close()


def _estimator(cfg: DictConfig, run_dir: Path, template, metric: str, executor) -> Fit | SampleMean:
    """The estimated fitness's state, from the run folder where an earlier start wrote it. An IRT fit
    scores the endpoints on every item first, on the workers."""
    estimate = cfg.estimate
    if estimate.estimator == "mean":
        warmup = 0 if estimate.warmup is None else estimate.warmup
        sample = SampleMean.of(run_dir, anchors=estimate.anchors, seed=(cfg.seed, estimate.seed), warmup=warmup)
        print(
            f"evomerge: estimated fitness: each candidate is scored on a random sample of {estimate.anchors} items "
            f"of {metric}, drawn again each generation, and estimated by its mean"
            + (f"; {warmup} generation(s) scored on every item first" if warmup else ""),
            flush=True,
        )
        return sample
    fit = fitted_estimator(
        run_dir,
        template,
        metric,
        anchors=estimate.anchors,
        dims=estimate.dims,
        seed=estimate.seed,
        refit=estimate.refit,
        warmup=1 if estimate.warmup is None else estimate.warmup,
        score_models=executor.score_models,
    )
    record = fit.record
    print(
        f"evomerge: estimated fitness: IRT fitted on {len(record['models'])} models x "
        f"{len(record['responses'][0])} items of {metric} ({record['items_scored']} items scored, {FIT_FILE})"
        + (f" and {len(record['learned'])} candidates" if fit.refit else "")
        + (f"; {fit.warmup} generation(s) scored on every item first" if fit.warmup else "")
        + f"; then each candidate is scored on {len(fit.estimator.anchors)} anchors"
        + ("; fitted again after each generation on its best" if fit.refit else ""),
        flush=True,
    )
    return fit


def build_executor(
    node: DictConfig, spec: WorkerSpec, on_worker: Callable[[dict], None] | None = None
) -> SerialExecutor | RayExecutor:
    """Workers in this process (``executor=serial``), or a pool of Ray actors (``executor=ray``);
    ``on_worker`` is called with each worker's name and memory-tier line as it starts."""
    if node.kind == "ray":
        from evomerge.executor.ray_pool import RayExecutor  # ray only where it is used (a GPU box may lack it)

        return RayExecutor(
            spec=spec,
            num_workers=node.num_workers,
            address=node.address,
            threads=node.threads,
            max_tries=node.max_tries,
            timeout_s=node.timeout_s,
            on_worker=on_worker,
            resources=None if node.resources is None else dict(node.resources),
        )
    return SerialExecutor(spec=spec, threads=node.threads, on_worker=on_worker)


def _instantiate_optimizer(cfg: DictConfig, genome: Genome, n_objectives: int, run_dir: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a study restored per resume is not news
    try:
        return instantiate(
            cfg.optimizer, space=genome.space, n_objectives=n_objectives, seed=cfg.seed, run_dir=str(run_dir)
        )
    except InstantiationException as error:
        # Hydra wraps what the constructor raised; a user error must reach the user as itself.
        if isinstance(error.__cause__, EvomergeError):
            raise error.__cause__ from None
        raise


def _diff(old: object, new: object, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            lines += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return lines
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
