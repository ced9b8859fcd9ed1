"""One table of what scripts/gpu_check.sh measured, from the logs it left in its output folder.

    python scripts/gpu_report.py OUT [--out results/gpu_check_cuda.md] [--device cpu] [--note TEXT]

gpu_check.sh runs this at its end; it also runs here on a folder the device tool brought back. Every
figure comes from OUT's logs (steps.md, env.txt, tests.log, bench.log, memory.log, search.log, host.log,
twin.log, multigpu.log): a step that ran out of time shows what it printed before it stopped.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BENCH_ROW = re.compile(r"^(?P<method>\w+): (?P<fields>b_first=.*)$")


def bench_rows(log: str) -> list[str]:
    rows = []
    for line in log.splitlines():
        match = BENCH_ROW.match(line)
        if not match:
            continue
        fields = dict(re.findall(r"(\w+)=([^,`]+?)(?:,|$)", match["fields"]))
        ms = {key: float(fields[key]) * 1e3 for key in ("a", "b")}
        rows.append(
            f"| {match['method']} | {ms['a']:.2f} ms, {float(fields['gbps']):,.0f} GB/s | {ms['b']:.2f} ms | "
            f"{float(fields['ratio']):.1f}× | {float(fields['b_first']):.2f} s | {int(fields['kept']) / 2**20:,.0f} MB | "
            f"{int(fields['peak_device']) / 2**20:,.0f} MB | {float(fields['c']):.1f} s |"
        )
    return rows


def lines_matching(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def report(folder: Path, device: str = "cuda", note: str = "") -> str:
    def read(name: str) -> str:
        path = folder / name
        return path.read_text(errors="replace") if path.is_file() else ""

    tests = read("tests.log")
    memory_rows = lines_matching(read("memory.log"), r"^\| .* \| \d+ \| ")
    search = read("search.log")
    lines = [
        "# GPU check" + ("" if device == "cuda" else f" (dry run on {device.upper()}, no GPU)"),
        "",
        *([note, ""] if note else []),
        f"Written by `python scripts/gpu_report.py {folder}` from the logs of `bash scripts/gpu_check.sh OUT {device}`; "
        "not edited by hand. Models: the bench's random Llamas (53 M parameters, bfloat16) and the toy world "
        "(full-seed0-v4).",
        "",
        "## Machine",
        "",
        "```",
        read("env.txt").strip(),
        "```",
        "",
        "## Steps (exit 124: the step ran out of its time limit)",
        "",
        read("steps.md").strip(),
        "",
        "## Tests on the device",
        "",
        *[f"- `{line.strip()}`" for line in lines_matching(tests, r"^(FAILED|ERROR)|passed|failed")],
        *[f"- `{line.strip()}`" for line in lines_matching(tests, r"^E +AssertionError")][:5],
        "",
        "## Merge bench on the device (bfloat16; (a) bandwidth floor, (b) in place, (c) `evomerge merge` in a fresh process)",
        "",
        "| method | (a) floor | (b) in place | b/a | (b) first call | kept by precompute | peak device memory | (c) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *bench_rows(read("bench.log")),
        "",
        "## Worker memory over 300 candidates (after the 1st / 10th / last candidate; growth; slope)",
        "",
        "| search | candidates | memory |",
        "| --- | --- | --- |",
        *memory_rows,
        "",
        "## A toy search on the device (serial executor, CMA-ES), exported and reloaded",
        "",
        "```",
        *lines_matching(search, r"^(generations|\| |  toy_|exported|reloaded)"),
        "```",
        "",
        "## The host memory tier streaming (scripts/bench_host_tier.py)",
        "",
        *lines_matching(read("host.log"), r"^\| |^host tier:"),
        "",
        "## Twin's forward (scripts/twin_bench.py --quick)",
        "",
        "```",
        *read("twin.log").strip().splitlines()[-12:],
        "```",
        "",
        "## The search on 2 GPUs per worker (executor.gpus_per_worker=2)",
        "",
        "```",
        *lines_matching(read("multigpu.log"), r"^(evomerge: memory tier|generations|gpus_per_worker=2)"),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="gpu_check.sh's output folder")
    parser.add_argument("--out", type=Path, default=None, help="default: FOLDER/gpu_check.md")
    parser.add_argument("--device", default="cuda", help="the device gpu_check.sh ran on (default cuda)")
    parser.add_argument("--note", default="", help="a paragraph under the title: how and where it ran")
    args = parser.parse_args()
    out = args.out or args.folder / "gpu_check.md"
    out.write_text(report(args.folder, args.device, args.note))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
