"""``evomerge`` command line: thin commands over the library; a user error is a paragraph, not a traceback."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from evomerge.errors import EvomergeError


def _merge(args: argparse.Namespace) -> None:
    from evomerge.materialize.to_disk import merge_to_disk
    from evomerge.recipe.recipe import load_recipe

    start = time.perf_counter()
    out = merge_to_disk(
        load_recipe(args.recipe),
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
    world = build_world(size=args.size, seed=args.seed, root=args.root, force=args.force)
    print(f"toy world ({args.size}, seed {args.seed}) ready in {time.perf_counter() - start:.1f} s at {world.root}")
    print(f"  base: {world.base}")
    for name, path in world.experts.items():
        print(f"  expert {name}: {path}")
    print(f"  tasks: {', '.join(world.tasks.values())} (include path {world.tasks_dir})")


def _demo(args: argparse.Namespace) -> None:
    from evomerge.demo import run_demo

    run_demo(size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge models from a recipe (evomerge or mergekit YAML)")
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
        "--root", default=None, help="cache folder (default $EVOMERGE_CACHE/toy or ~/.cache/evomerge/toy)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(run=_toy_build)

    demo = commands.add_parser("demo", help="build the toy world and merge it (the README's demo)")
    demo.add_argument("--size", choices=["tiny", "full"], default="full")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
