"""Build (or find in the cache) the toy world and print where its models and tasks are.

python scripts/build_toy_models.py --size full --seed 0 [--root DIR] [--force]
python scripts/build_toy_models.py --size full --seed 0 --report results/toy_world.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evomerge.toy import build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="cache folder (default: $EVOMERGE_CACHE/toy)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete copy is cached")
    parser.add_argument("--report", type=Path, default=None, help="also measure the world and write this file")
    args = parser.parse_args()

    start = time.perf_counter()
    world = build_world(size=args.size, seed=args.seed, root=args.root, force=args.force)
    print(f"toy world ({args.size}, seed {args.seed}) ready in {time.perf_counter() - start:.1f} s: {world.root}")
    print(f"  base        {world.base}")
    for name, path in {**world.experts, **world.incompatible}.items():
        print(f"  {name:<11} {path}")
    print(f"  tasks       {world.tasks_dir}  {world.tasks}")
    print("  build times " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in world.build_seconds.items()))
    if args.report is not None:
        from evomerge.toy.report import write_report

        command = f"python scripts/build_toy_models.py --size {args.size} --seed {args.seed} --report {args.report}"
        write_report(world, args.report, command=command)
        print(f"report written to {args.report}")


if __name__ == "__main__":
    main()
