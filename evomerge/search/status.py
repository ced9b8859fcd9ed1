"""`evomerge status RUN_DIR`: how a run stands, read from its folder alone (live, finished or killed).

It reads config.yaml, evaluations.jsonl, checkpoint.pkl, heartbeat.json and workers.jsonl, and writes
nothing, so it works from any node that sees the folder while the driver goes on.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError
from evomerge.search.heartbeat import driver_alive, read_heartbeat
from evomerge.search.run_folder import RunFolder

WORKERS = "workers.jsonl"  # one line per worker start: its name and memory-tier line (Worker.started)


def append_worker(folder: Path, started: dict) -> None:
    with open(Path(folder) / WORKERS, "a") as handle:
        handle.write(json.dumps(started) + "\n")


def partial(row: dict) -> bool:
    """A candidate racing stopped early, or scored on anchor items only: its score is an estimate."""
    return "items" in row and row["items"][0] < row["items"][1]


def read_status(folder: str | Path, now: float | None = None) -> dict:
    """The run's status as plain data (what ``--json`` prints)."""
    folder = Path(folder)
    run = RunFolder(folder)
    if not run.config_path.exists():
        raise EvomergeError(f"'{folder}' holds no evomerge run (no config.yaml)", "check the path")
    now = time.time() if now is None else now
    config = yaml.safe_load(run.config_path.read_text())
    objectives = [o["name"] for o in config["objectives"]]
    rows = run.read_evaluations()
    state = run.load_checkpoint()
    beat = read_heartbeat(folder)
    alive, why = driver_alive(beat, now) if beat else (False, "no heartbeat.json (written since evomerge 0.2)")
    elapsed = beat.get("elapsed_s") if beat else None
    if elapsed is not None and alive:
        elapsed += now - beat["time"]
    elif elapsed is None and state is not None:
        elapsed = state.elapsed_s  # search time up to the last checkpoint
    rate = 3600 * len(rows) / elapsed if elapsed else None
    budget = config["budget"]
    return {
        "run_dir": str(folder),
        "alive": alive,
        "driver": None if beat is None else {k: beat[k] for k in ("host", "pid", "state")} | {"why": why},
        "objectives": objectives,
        "evaluations": len(rows),
        "budget": {"evaluations": budget["evaluations"], "wall_time_s": budget["wall_time_s"]},
        "generations": max(row["generation"] for row in rows) + 1 if rows else 0,
        "checkpointed": None if state is None else {"evaluations": state.evaluations, "generations": state.generation},
        "elapsed_s": elapsed,
        "candidates_per_hour": rate,
        "eta_s": _eta(budget, len(rows), elapsed, rate) if alive else None,
        "workers": _workers(rows, folder),
        "items": _items(rows),
        "best": _best(rows, objectives),
        "failures": [
            {"error": error, "count": count}
            for error, count in Counter(row["error"].splitlines()[0] for row in rows if row["error"]).most_common()
        ],
    }


def _eta(budget: dict, done: int, elapsed: float | None, rate: float | None) -> float | None:
    """Seconds until the budget is spent at the run's pace so far: the sooner of its two limits."""
    left = []
    if budget["evaluations"] is not None and rate:
        left.append(3600 * max(budget["evaluations"] - done, 0) / rate)
    if budget["wall_time_s"] is not None and elapsed is not None:
        left.append(max(budget["wall_time_s"] - elapsed, 0.0))
    return min(left) if left else None


def _workers(rows: list[dict], folder: Path) -> list[dict]:
    """Per worker: candidates scored, time spent scoring them, and its latest memory-tier line."""
    memory = {}
    path = folder / WORKERS
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                started = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            memory[started["worker"]] = started["memory"]
    scored = Counter(row.get("worker") for row in rows if not row["cached"] and row.get("worker"))
    busy = Counter()
    for row in rows:
        if not row["cached"] and row.get("worker"):
            busy[row["worker"]] += row["seconds"]
    out = []
    for name in dict.fromkeys([*memory, *scored]):
        count, seconds = scored.get(name, 0), busy.get(name, 0.0)
        per_hour = 3600 * count / seconds if seconds else None
        out.append({"worker": name, "candidates": count, "busy_s": seconds, "per_hour_busy": per_hour})
        out[-1]["memory"] = memory.get(name)
    return out


def _items(rows: list[dict]) -> dict | None:
    counted = [row["items"] for row in rows if "items" in row and not row["cached"]]
    if not counted:
        return None
    return {
        "scored": sum(i[0] for i in counted),
        "total": sum(i[1] for i in counted),
        "candidates": len(counted),
        "partial": sum(1 for i in counted if i[0] < i[1]),
    }


def _best(rows: list[dict], objectives: list[str]) -> dict | None:
    """The best fully scored candidate by the first objective (the earliest among ties), as the loop's."""
    full = [r for r in rows if r["error"] is None and r["scores"] and None not in r["scores"] and not partial(r)]
    if not full:
        return None
    row = max(full, key=lambda r: (r["scores"][0], -r["index"]))
    best = {
        "index": row["index"],
        "generation": row["generation"],
        "scores": dict(zip(objectives, row["scores"], strict=True)),
        "metrics": row["metrics"],
        "recipe": recipe_summary(row["recipe"]),
    }
    if "held_out" in row:  # held-out metrics, where the run logs them beside the searched ones
        best["held_out"] = row["held_out"]
    return best


def recipe_summary(recipe: dict) -> str:
    """One line: the method, then each model's knobs (one value, or their range and mean over layers)."""
    if recipe.get("kind") is not None:
        path = recipe["path"]
        used = Counter(step["source"] for step in path)
        return f"{recipe['kind']}: a path of {len(path)} layers, " + ", ".join(
            f"{used[i]} from {_short(source)}" for i, source in enumerate(recipe["sources"]) if used[i]
        )
    parts = [recipe["method"]]
    for entry in recipe["models"]:
        knobs = [f"{name} {_values(value)}" for name, value in entry.items() if name != "model"]
        parts.append(f"{_short(entry['model'])}: {', '.join(knobs) or 'no knobs'}")
    for name, value in recipe.get("parameters", {}).items():
        parts.append(f"{name} {_values(value)}")
    return "; ".join(parts)


def _short(model: str) -> str:
    return Path(model.split("@")[0]).name or model


def _values(value) -> str:
    numbers = _numbers(value)
    if not numbers:
        return str(value)
    low, high = min(numbers), max(numbers)
    if math.isclose(low, high):
        return f"{low:.3g}"
    return f"{low:.2f}..{high:.2f} (mean {sum(numbers) / len(numbers):.2f})"


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return []


def format_status(status: dict) -> str:
    lines = []
    driver = status["driver"]
    where = f" (host {driver['host']}, pid {driver['pid']})" if driver else ""
    why = driver["why"] if driver else "no heartbeat"
    lines.append(f"run {status['run_dir']}: {'alive' if status['alive'] else 'not alive'}{where}: {why}")
    budget = status["budget"]["evaluations"]
    done = status["evaluations"]
    of = f" of {budget} ({done / budget:.0%})" if budget else ""
    checkpointed = status["checkpointed"]
    saved = f", checkpoint at {checkpointed['evaluations']}" if checkpointed else ", no checkpoint yet"
    lines.append(f"evaluations {done}{of}, generations {status['generations']}{saved}")
    rate = status["candidates_per_hour"]
    eta = status["eta_s"]
    pace = f"elapsed {_duration(status['elapsed_s'])}"
    if rate is not None:
        pace += f", {rate:,.0f} candidates/h"
    if status["alive"]:
        pace += f", ETA {_duration(eta)}" if eta is not None else ""
    lines.append(pace)
    for worker in status["workers"]:
        if worker["candidates"]:
            speed = f", {worker['per_hour_busy']:,.0f}/h while scoring" if worker["per_hour_busy"] else ""
            done = f"{worker['candidates']} scored in {_duration(worker['busy_s'])}{speed}"
        else:  # racing and the estimate rebuild their Outcomes from rounds, without the worker
            done = "no row names it"
        lines.append(f"  worker {worker['worker']}: {done}")
        if worker["memory"]:
            lines.append(f"    {worker['memory']}")
    items = status["items"]
    if items:
        lines.append(
            f"items scored {items['scored']:,} of {items['total']:,} ({items['scored'] / items['total']:.0%}) "
            f"over {items['candidates']} candidates, {items['partial']} of them partial (stopped early or estimated)"
        )
    best = status["best"]
    if best is None:
        lines.append("best so far: none fully scored yet")
    else:
        scores = " ".join(f"{name}={value:.4f}" for name, value in best["scores"].items())
        lines.append(f"best so far (fully scored): #{best['index']}, generation {best['generation']}: {scores}")
        metrics = {k: v for k, v in (best["metrics"] or {}).items() if v is not None}
        if metrics:
            lines.append("  metrics: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        if best.get("held_out"):
            lines.append("  held out: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(best["held_out"].items())))
        lines.append(f"  recipe: {best['recipe']}")
    failures = status["failures"]
    lines.append(f"failures: {sum(f['count'] for f in failures)}")
    lines += [f"  {f['count']} x {f['error']}" for f in failures]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
