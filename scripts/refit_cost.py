"""How long estimated fitness's refit takes at MMLU size (60 models x 14,000 items), and whether the workers
wait for it: results/refit_cost.md.

    python scripts/refit_cost.py [--models 60] [--items 14000] [--out results/refit_cost.md]

The responses are drawn from a 2-dimensional 2PL model (the IRT model itself), so the fit has structure to
find. Timed: the endpoints' fit (3 models, from scratch), and a refit on the endpoints plus the rest (from
the endpoints' fit, as ``Fit`` does). The refit runs on a thread while the next generation is scored, so a
generation waits for it only where scoring a generation takes less time than the refit (the table says
how long that is).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from evomerge.evaluate import irt
from evomerge.evaluate.irt import AnchorEstimator


def responses(models: int, items: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta, alpha, beta = rng.normal(size=(models, 2)), rng.normal(size=(items, 2)), rng.normal(0, 1.5, items)
    return (rng.random((models, items)) < 1 / (1 + np.exp(-(theta @ alpha.T - beta)))).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=60)
    parser.add_argument("--items", type=int, default=14000)
    parser.add_argument("--anchors", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("results/refit_cost.md"))
    args = parser.parse_args()
    y = responses(args.models, args.items)
    started = time.perf_counter()
    endpoints = AnchorEstimator.fit(y[:3], n_anchors=args.anchors, dims=2, seed=0)
    endpoint_s = time.perf_counter() - started
    started = time.perf_counter()
    AnchorEstimator.fit(y, n_anchors=args.anchors, dims=2, seed=0, start=endpoints)
    refit_s = time.perf_counter() - started
    # A candidate's estimate from its anchors: what the driver does per candidate, on the critical path.
    refitted = AnchorEstimator.fit(y[:5], n_anchors=args.anchors, dims=2, seed=0, start=endpoints)
    started = time.perf_counter()
    for row in y[5:25]:
        refitted.estimate(row[refitted.anchors])
    estimate_ms = (time.perf_counter() - started) / 20 * 1000
    command = f"python scripts/refit_cost.py --models {args.models} --items {args.items} --anchors {args.anchors}"
    lines = [
        "# Estimated fitness: the cost of a refit at MMLU size",
        "",
        f"`{command}` on {platform.machine()}, {os.cpu_count()} cores (shared with other work while it ran), "
        f"numpy {np.__version__}. Responses drawn from a 2-dimensional 2PL model.",
        "",
        "| step | models x items | Adam steps (each fit; 1 + 5 cross-validation folds) | seconds |",
        "| --- | --- | --- | --- |",
        f"| endpoints' fit, from scratch | 3 x {args.items} | {irt._FIT_STEPS} | {endpoint_s:.1f} |",
        f"| refit, from the endpoints' fit | {args.models} x {args.items} | {irt._REFIT_STEPS} | {refit_s:.1f} |",
        f"| one candidate's estimate from {args.anchors} anchors | - | - | {estimate_ms / 1000:.4f} |",
        "",
        f"The refit runs on a thread while the next generation is scored (`Fit`, evomerge/search/estimate.py): "
        f"the workers wait for it only where a generation is scored in less than {refit_s:.0f} s. Before, it "
        f"ran {irt._FIT_STEPS} steps from scratch, in the driver, between generations, with every worker idle.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
