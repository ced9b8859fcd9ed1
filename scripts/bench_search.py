"""How well the Ray executor keeps its workers busy on the toy world, and what a resume or a worker failure costs.

    python scripts/bench_search.py --workers 2 -- budget.evaluations=96 optimizer.popsize=8

Four searches through the real session (preset=toy, executor=ray, a local Ray instance):
1. a straight run in generations (CMA-ES, the overrides after --): workers' busy share (worker-seconds
   scoring / (loop wall time x workers)), the driver's time per generation outside waiting on workers,
   evaluations per hour, and where each worker's idle time goes (timestamps taken in the workers and in
   the driver, on one clock);
2. a resume of that run for one more generation: the start-up it pays (Ray pool, checkpoint);
3. the same run with one worker killed (SIGKILL) mid-run: the wall time it adds;
4. an asynchronous run (--asynchronous: TPE, in_flight candidates out, one asked per result told):
   the same busy share and driver time, and where the driver's time goes.
Writes results/bench_search.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir

import evomerge.executor.ray_pool as ray_pool
import evomerge.search.session as session
from evomerge.config import CONF_DIR, register_configs
from evomerge.executor.ray_pool import RayExecutor, WorkerActor
from evomerge.io.atomic import atomic_write_text
from evomerge.optimizer.base import Optimizer
from evomerge.optimizer.optuna_sampler import OptunaStudyFile
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import resume, start


class Watch:
    """Wraps RayExecutor.evaluate: time the driver waits on workers, and an optional kill of one worker."""

    def __init__(self, *, kill_after: int | None) -> None:
        self.waiting_s = 0.0
        self.waiting_cpu_s = 0.0  # of the driver's thread, inside the executor's generator
        self.kill_after = kill_after
        self.seen = 0
        self._evaluate = RayExecutor.evaluate

    def __enter__(self) -> Watch:
        watch = self

        def evaluate(executor, recipes):
            results = watch._evaluate(executor, recipes)
            while True:
                began, began_cpu = time.perf_counter(), time.thread_time()
                try:
                    item = next(results)
                except StopIteration:
                    watch.waiting_s += time.perf_counter() - began
                    watch.waiting_cpu_s += time.thread_time() - began_cpu
                    return
                watch.waiting_s += time.perf_counter() - began
                watch.waiting_cpu_s += time.thread_time() - began_cpu
                watch.seen += 1
                if watch.seen == watch.kill_after:
                    os.kill(executor.worker_pids()[0], signal.SIGKILL)
                yield item

        RayExecutor.evaluate = evaluate
        return self

    def __exit__(self, *exc) -> None:
        RayExecutor.evaluate = self._evaluate


class StampedWorkerActor(WorkerActor):
    """A worker that appends ``start end`` (time.monotonic) of each candidate to ``<folder>/<pid>``.

    CLOCK_MONOTONIC is one clock for every process on a Linux machine, so these stamps and the
    driver's line up. Defined in this script, the class travels to the workers by value."""

    folder = ""

    def evaluate(self, recipe):
        started = time.monotonic()
        outcome = super().evaluate(recipe)
        finished = time.monotonic()
        with open(os.path.join(self.folder, str(os.getpid())), "a") as stamps:
            stamps.write(f"{started} {finished}\n")
        return outcome


class Timeline:
    """Stamps the loop's steps in the driver (ask, tell, checkpoint, log rows) and, through
    StampedWorkerActor, each candidate in the workers."""

    STEPS = (
        (Optimizer, "ask"),
        (Optimizer, "tell"),
        (Optimizer, "ask_one"),
        (Optimizer, "tell_one"),
        (RunFolder, "save_checkpoint"),
        (RunFolder, "append_evaluation"),
        (OptunaStudyFile, "_write"),
    )

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._saved = {}
        # CPU time of the driver's thread (time.thread_time) at the first ask and when the loop returns:
        # what it worked, whatever the other processes on the box took from its wall time.
        self.cpu_at_first_ask: float | None = None
        self.cpu_at_loop_end = 0.0

    def __enter__(self) -> Timeline:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        StampedWorkerActor.folder = str(self.folder)
        self._saved[ray_pool, "WorkerActor"] = ray_pool.WorkerActor
        ray_pool.WorkerActor = StampedWorkerActor
        for owner, name in self.STEPS:
            self._saved[owner, name] = getattr(owner, name)
            setattr(owner, name, self._stamped(name, getattr(owner, name)))
        for name in ("run_search", "run_window_search"):
            self._saved[session, name] = getattr(session, name)
            setattr(session, name, self._clocked(getattr(session, name)))
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)

    def _stamped(self, name, method):
        steps = self.steps[name]

        def stamped(*args, **kwargs):
            if name in ("ask", "ask_one") and self.cpu_at_first_ask is None:
                self.cpu_at_first_ask = time.thread_time()
            began = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                steps.append((began, time.monotonic()))

        return stamped

    def _clocked(self, loop):
        def clocked(*args, **kwargs):
            try:
                return loop(*args, **kwargs)
            finally:
                self.cpu_at_loop_end = time.thread_time()

        return clocked

    def driver_cpu_s(self, watch: Watch) -> float:
        """The driver thread's CPU seconds in the loop, outside the executor's generator."""
        return self.cpu_at_loop_end - self.cpu_at_first_ask - watch.waiting_cpu_s

    def workers(self) -> list[list[tuple[float, float]]]:
        """Each worker's candidates as (start, end), in order."""
        return [
            sorted(tuple(map(float, line.split())) for line in path.read_text().splitlines())
            for path in sorted(self.folder.iterdir())
        ]

    def windows(self) -> list[tuple[float, float]]:
        """Each generation's wall time: from its ask to the next ask; the last one ends when its
        checkpoint is on disk. Together: the loop's wall time, whatever the driver did in it."""
        asks = [began for began, _ in self.steps["ask"]]
        return list(zip(asks, [*asks[1:], self.steps["save_checkpoint"][-1][1]], strict=True))

    def idle_split(self) -> dict[str, float]:
        """Worker-seconds in each part of the generations' windows, summed over generations and workers."""
        parts = dict.fromkeys(("busy", "lead_in", "between", "tail", "wrap_up"), 0.0)
        workers = self.workers()
        for opened, closed in self.windows():
            mine = [[(s, e) for s, e in worker if opened <= s < closed] for worker in workers]
            last_end = max(e for runs in mine for _, e in runs)
            for runs in mine:
                if not runs:  # more workers than candidates: this one waited the whole generation
                    parts["tail"] += closed - opened
                    continue
                parts["busy"] += sum(e - s for s, e in runs)
                parts["lead_in"] += runs[0][0] - opened
                parts["between"] += sum(b[0] - a[1] for a, b in pairwise(runs))
                parts["tail"] += last_end - runs[-1][1]
                parts["wrap_up"] += closed - last_end
        return parts

    def per_generation_ms(self, name: str) -> float:
        return 1000 * sum(e - s for s, e in self.steps[name]) / len(self.steps["save_checkpoint"])

    def loop_wall(self) -> tuple[float, float]:
        """From the first ask (of a generation or of one candidate) to the last checkpoint on disk."""
        first = min(began for name in ("ask", "ask_one") for began, _ in self.steps[name][:1])
        return first, self.steps["save_checkpoint"][-1][1]

    def idle_split_asynchronous(self) -> dict[str, float]:
        """Worker-seconds of the loop's wall: scoring, before the first candidate, between two, after the last."""
        opened, closed = self.loop_wall()
        parts = dict.fromkeys(("busy", "lead_in", "between", "tail"), 0.0)
        for runs in self.workers():
            parts["busy"] += sum(e - s for s, e in runs)
            parts["lead_in"] += runs[0][0] - opened
            parts["between"] += sum(b[0] - a[1] for a, b in pairwise(runs))
            parts["tail"] += closed - runs[-1][1]
        return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench-search"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_search.md"))
    parser.add_argument(
        "--asynchronous",
        nargs="*",
        default=["optimizer=tpe", "optimizer.batch_size=8", "optimizer.n_startup_trials=8", "in_flight=8"],
        help="Hydra overrides of the asynchronous run, after the others but for optimizer.popsize",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()

    register_configs()
    shutil.rmtree(args.work, ignore_errors=True)
    load_before = os.getloadavg()
    began = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False)
    ray_start_s = time.perf_counter() - began
    fixed = ["preset=toy", "executor=ray", f"executor.num_workers={args.workers}", "seed=1", *args.overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=fixed)

    straight = args.work / "straight"
    with Watch(kill_after=None) as watch, Timeline(args.work / "stamps") as timeline:
        began = time.perf_counter()
        state = start(cfg, straight)
        total_s = time.perf_counter() - began
    loop_s = sum(closed - opened for opened, closed in timeline.windows())
    busy = state.evaluating_s / (loop_s * args.workers)
    driver_s = (loop_s - watch.waiting_s) / state.generation
    driver_cpu_s = timeline.driver_cpu_s(watch) / state.generation
    durations = [end - began for worker in timeline.workers() for began, end in worker]
    mean_s, spread_s = statistics.mean(durations), statistics.stdev(durations)
    share = {name: 100 * seconds / (loop_s * args.workers) for name, seconds in timeline.idle_split().items()}
    per_generation = {name: timeline.per_generation_ms(name) for _, name in Timeline.STEPS}

    generation = int(cfg.optimizer.popsize)
    began = time.perf_counter()
    resumed = resume(straight, [f"budget.evaluations={state.evaluations + generation}"], force=True)
    resume_total_s = time.perf_counter() - began
    resume_cost_s = resume_total_s - (resumed.elapsed_s - state.elapsed_s)

    with Watch(kill_after=state.evaluations // 2):
        failed = start(cfg, args.work / "killed")
    lost = [r for r in RunFolder(args.work / "killed").read_evaluations() if r["error"] is not None]
    same = [r["key"] for r in RunFolder(args.work / "killed").read_evaluations()] == [
        r["key"] for r in RunFolder(straight).read_evaluations()
    ][: failed.evaluations]

    shared = [o for o in fixed if not o.startswith("optimizer.")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg_async = compose("config", overrides=[*shared, *args.asynchronous])
    with Watch(kill_after=None) as watch_async, Timeline(args.work / "stamps_async") as timeline_async:
        asynchronous = start(cfg_async, args.work / "asynchronous")
    opened, closed = timeline_async.loop_wall()
    loop_async_s = closed - opened
    busy_async = asynchronous.evaluating_s / (loop_async_s * args.workers)
    per_eight = 8 / asynchronous.evaluations  # figures per 8 evaluations, a CMA-ES generation's worth
    driver_async_s = (loop_async_s - watch_async.waiting_s) * per_eight
    driver_cpu_async_s = timeline_async.driver_cpu_s(watch_async) * per_eight
    split_async = {
        name: 100 * seconds / (loop_async_s * args.workers)
        for name, seconds in timeline_async.idle_split_asynchronous().items()
    }
    steps_async = {
        name: 1000 * sum(e - s for s, e in timeline_async.steps[name]) * per_eight
        for name in ("ask_one", "tell_one", "append_evaluation", "save_checkpoint", "_write")
    }
    in_flight = int(cfg_async.in_flight)

    load = os.getloadavg()
    lines = [
        "# Search throughput with the Ray executor (toy world)",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"work (1-minute load average {load_before[0]:.1f} at the start, {load[0]:.1f} at the end), no GPU; "
        f"a local Ray instance with {args.workers} workers of 1 torch thread each (started in {ray_start_s:.1f} s). "
        f"World: the toy world `{Path(cfg.models.base).parents[1].name}` (`preset=toy`), method `{cfg.method.name}`, "
        f"CMA-ES, {state.evaluations} evaluations in generations of {generation}.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| workers busy: worker-seconds scoring / (loop wall x {args.workers}) | {100 * busy:.1f}% | > 95% |",
        f"| driver time per generation outside the executor (ask, recipes, rows, tell, checkpoint) "
        f"| {1000 * driver_s:.1f} ms ({100 * driver_s * state.generation / loop_s:.2f}% of loop wall) | < 1% |",
        f"| of which the driver thread's CPU time (the rest: waiting for a core the workers hold) "
        f"| {1000 * driver_cpu_s:.1f} ms ({100 * driver_cpu_s * state.generation / loop_s:.2f}% of loop wall) | |",
        f"| seconds per candidate on one worker: mean, standard deviation | {mean_s:.3f} s, {spread_s:.3f} s | |",
        f"| evaluations per hour (loop wall) | {3600 * state.evaluations / loop_s:,.0f} | |",
        f"| straight run, wall incl. pool start | {total_s:.1f} s (loop wall {loop_s:.1f} s) | |",
        f"| resume: start-up paid (pool start, checkpoint load) | {resume_cost_s:.1f} s | |",
        f"| one worker killed mid-run: extra search time (`elapsed_s`) | {failed.elapsed_s - state.elapsed_s:+.1f} s "
        f"(failed rows: {len(lost)}; same candidates as the straight run: {same}) | nothing lost |",
        "",
        "Loop wall: from the first `ask` to the last checkpoint on disk, timed in the driver. A worker is "
        "busy while it materializes and scores a candidate (the worker's own clock, `Outcome.seconds`). "
        "The driver's time is the loop wall minus the time the loop spent inside the executor's generator "
        "(waiting on workers, handing out candidates, collecting results). On this box the driver shares "
        f"{os.cpu_count()} cores with {args.workers} busy workers, so its wall time includes waiting for a core; "
        "its thread's CPU time (`time.thread_time`, the same bounds, the executor's generator left out) is "
        "the work it does.",
        "",
        "## Where the workers' time goes (straight run)",
        "",
        "Each generation's window runs from its `ask` to the next `ask` (the last one to its checkpoint on "
        "disk); per worker it splits into the parts below, from timestamps taken in the workers and in "
        f"the driver on one clock, as shares of loop wall x workers ({loop_s:.1f} s x {args.workers}).",
        "",
        "| part of the window | share |",
        "| --- | --- |",
        f"| busy: materializing and scoring candidates | {share['busy']:.1f}% |",
        f"| lead-in: ask, recipes and cache keys, until the worker's first candidate starts | {share['lead_in']:.1f}% |",
        f"| between candidates: the worker done until its next candidate starts (Ray round trip) "
        f"| {share['between']:.1f}% |",
        f"| generation tail: this worker done, another still scoring the generation's last candidate "
        f"| {share['tail']:.1f}% |",
        f"| wrap-up: last result back, rows logged, tell, checkpoint handed over, progress bar "
        f"| {share['wrap_up']:.1f}% |",
        "",
        "| driver step, per generation | ms |",
        "| --- | --- |",
        f"| ask | {per_generation['ask']:.1f} |",
        f"| tell | {per_generation['tell']:.1f} |",
        f"| checkpoint write: fsync the log, write the pickled state, fsync, rename (on a thread, overlapping the next "
        f"generation) | {per_generation['save_checkpoint']:.1f} |",
        f"| log rows: append and flush, {generation} rows | {per_generation['append_evaluation']:.1f} |",
        "",
        "Each worker keeps one candidate queued behind its running one while more candidates wait than "
        "there are workers, so most candidates start without a round trip to the driver. The generation "
        "tail is what is left: CMA-ES asks a whole generation at a time, so a worker that finishes its "
        "last candidate waits for the others'; it grows with the spread of candidate times (the standard "
        "deviation above), which on this shared box follows the other work's load. Plots are written once, after the loop, not per generation. A killed worker costs "
        "the candidate it was scoring (re-run on another worker) plus the restart of its process (Python "
        "imports and loading the sources), during which the pool runs one worker short.",
    ]
    lines += [
        "",
        "## Asynchronous: TPE, a new candidate asked as each result is told",
        "",
        f"`{' '.join(args.asynchronous)}` with the same world, workers and budget ({asynchronous.evaluations} "
        f"evaluations): {in_flight} candidates out at once; each time the oldest is told, the next is asked "
        "(results are told in proposal order, so the serial executor, any pool and a resumed run ask the same "
        "candidates). Figures per 8 evaluations, a CMA-ES generation's worth.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| workers busy: worker-seconds scoring / (loop wall x {args.workers}) | {100 * busy_async:.1f}% | > 95% |",
        f"| driver time per 8 evaluations outside the executor | {1000 * driver_async_s:.1f} ms "
        f"({100 * (loop_async_s - watch_async.waiting_s) / loop_async_s:.2f}% of loop wall) | < 1% |",
        f"| of which the driver thread's CPU time | {1000 * driver_cpu_async_s:.1f} ms "
        f"({100 * driver_cpu_async_s / per_eight / loop_async_s:.2f}% of loop wall) | |",
        f"| evaluations per hour (loop wall) | {3600 * asynchronous.evaluations / loop_async_s:,.0f} | |",
        f"| loop wall | {loop_async_s:.1f} s | |",
        "",
        "| part of the loop's wall, per worker | share |",
        "| --- | --- |",
        f"| busy: materializing and scoring candidates | {split_async['busy']:.1f}% |",
        f"| lead-in: until the worker's first candidate starts | {split_async['lead_in']:.1f}% |",
        f"| between candidates: waiting for the next one | {split_async['between']:.1f}% |",
        f"| tail: after the worker's last candidate, until the last checkpoint is on disk | {split_async['tail']:.1f}% |",
        "",
        "| driver step, per 8 evaluations | ms |",
        "| --- | --- |",
        f"| ask_one (TPE's sampling) | {steps_async['ask_one']:.1f} |",
        f"| tell_one | {steps_async['tell_one']:.1f} |",
        f"| log rows: append and flush | {steps_async['append_evaluation']:.1f} |",
        f"| checkpoint write (on a thread) | {steps_async['save_checkpoint']:.1f} |",
        f"| optuna.db refresh (on a thread of its own, merged while one is running) | {steps_async['_write']:.1f} |",
        "",
        "No generation tail here: a worker that finishes takes a candidate already queued, and the loop asks "
        "the next one while the workers score. The driver's own time is TPE's: its sampling (multivariate, "
        "over every knob) runs once per candidate on the driver, overlapping the workers' scoring but taking "
        "CPU from them on a box this small. optuna.db is written on a thread off the tell path; optuna's SQLite "
        "storage spends tens of milliseconds per trial, CPU the workers also share here.",
    ]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    ray.shutdown()


if __name__ == "__main__":
    main()
