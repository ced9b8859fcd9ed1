#!/usr/bin/env bash
# The GPU check: everything evomerge has to prove on a CUDA GPU, in one command of at most 8 minutes (its steps' limits sum to 475 s), on a
# bare machine without network (Python 3.12, torch, transformers, safetensors, accelerate and triton
# preinstalled; nothing else of ours).
#
#   bash scripts/gpu_wheels.sh                       # here, with network: the other wheels into .whl/gpu
#   evomerge toy build, then copy its models/{base,lang,math}, tasks and BUILD_COMPLETE.json into
#     .cache/gpu-world/toy/full-seed0-v4/ (its task files' absolute paths are rewritten there)
#   bash scripts/gpu_check.sh OUT [cuda|cpu]         # there: writes OUT/steps.md, OUT/*.log, OUT/results/
# Carry .whl/gpu and .cache/gpu-world (60 MiB together). Without a carried world, the memory and search steps
# build the full toy world first (minutes).
#
# Steps, each with its own time limit so one slow step cannot eat the others' time (a step that runs out
# is marked 124 in OUT/steps.md and the check goes on):
#   install   the wheel folder (--no-index); evomerge itself runs from the checkout (PYTHONPATH)
#   tests     the CUDA tests: every method on CUDA against the CPU, and in place against to disk on models
#             large enough for the compiled (Triton) kernels, in float32 and bfloat16 (and so the float32
#             eager fallback); each memory tier (resident, host streamed from pinned memory, disk) against
#             to disk; the host buffer page-locked, bytes as counted; DFS and optimizers
#   bench     scripts/bench_merge.py --device cuda --dtype bfloat16 (no mergekit there: no (d) column), with
#             its seconds per candidate in each memory tier
#   memory    scripts/bench_memory.py on the device over 300 candidates (TIES, DARE-TIES)
#   search    a short toy search on the device with the serial executor, then its export, reloaded
#   host      scripts/bench_host_tier.py: the host tier at 3 x 0.54 B parameters (3.2 GiB of sources): bytes
#             page-locked against bytes counted, seconds per candidate against the copy floor and resident
#   twin      scripts/twin_bench.py --quick (Twin's forward on the device), where the checkout has it
#   multigpu  with 2 or more GPUs: the search step's search with executor.gpus_per_worker=2, its scores
#             compared with the one-GPU search's
# The tables land in OUT/results/ as *_cuda.md, and scripts/gpu_report.py gathers every step's figures into
# OUT/gpu_check_cuda.md: commit it as results/gpu_check_cuda.md.
# With DEVICE=cpu it is the same check on the CPU (a dry run in a fresh venv). The venv imitating the GPU
# machine, and the dry run (results/gpu_check_cpu_dryrun.md):
#   python3.12 -m venv /tmp/gpu312 && /tmp/gpu312/bin/python -m pip install torch==2.11.0 transformers==5.17.0 safetensors accelerate
#   PYTHON=/tmp/gpu312/bin/python bash scripts/gpu_check.sh /tmp/gpucheck-out cpu
# On a CPU the bench and memory steps (bfloat16, eager kernels before torch 2.13) need minutes more than their limits.
# Limits: on the H200 (results/gpu_check_cuda.md, 2026-12-04) install took 17 s, tests 44 s, bench 39 s and
# search 29 s, and memory ran out at 100 s after its TIES search: memory has 140 s, and the three later steps
# (host, twin, multigpu) the time the others gave back. A step that is skipped records why in steps.md.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT [cuda|cpu]}
DEVICE=${2:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
export EVOMERGE_CACHE=${EVOMERGE_CACHE:-$PWD/.cache/gpu-world}
# The carried world's task files name their data by absolute path, as written where it was built.
for task in "$EVOMERGE_CACHE"/toy/*/tasks/*/*.yaml; do
    [ -f "$task" ] && sed -i -E "s#( +test: ).*/(toy/[^/]+/tasks/)#\1$EVOMERGE_CACHE/\2#" "$task"
done
# evomerge runs from this checkout (no build step, so no setuptools needed there); `evomerge` is a shim.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/bin"
printf '#!/usr/bin/env bash\nexec %s -m evomerge.cli "$@"\n' "$PY" > "$OUT/bin/evomerge"
chmod +x "$OUT/bin/evomerge"
export PATH=$OUT/bin:$PATH
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
began=$(date +%s)
echo "| step | exit | seconds |" > "$OUT/steps.md"
echo "| --- | --- | --- |" >> "$OUT/steps.md"

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND into OUT/NAME.log, record its exit status and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s) at +$((start - began))s: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "| $name | $rc | $(($(date +%s) - start)) |" >> "$OUT/steps.md"
    tail -n 3 "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" --version
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('transformers', transformers.__version__)"
    nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step install 30 bash -c "'$PY' -m pip install --no-index --find-links .whl/gpu -r .whl/gpu/requirements.txt \
    && '$PY' -m pip install --no-index --find-links .whl/gpu --no-deps -r .whl/gpu/requirements-nodeps.txt \
    && '$PY' -m pip list"

step tests 75 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --durations=8 \
    tests/test_device_merge.py "tests/test_methods.py::test_runs_on_cuda_like_on_cpu" \
    tests/test_dataflow.py tests/test_optimizers.py tests/test_merge.py tests/test_memory_tiers.py tests/test_host_buffer.py

step bench 60 "$PY" scripts/bench_merge.py --device "$DEVICE" --dtype bfloat16 --repeats 5 --runs 1 \
    --work /tmp/evomerge-bench --out "$OUT/results/bench_merge_$DEVICE.md"

step memory 140 "$PY" scripts/bench_memory.py --device "$DEVICE" --dtype bfloat16 --candidates 300 \
    --searches "ties (PS),dare_ties (PS)" --out "$OUT/results/bench_memory_$DEVICE.md"

step search 45 bash -c "evomerge search preset=toy executor=serial optimizer=cmaes device=$DEVICE dtype=bfloat16 \
    budget.evaluations=24 seed=1 run_dir=$OUT/search-run \
    && evomerge export $OUT/search-run $OUT/search-best \
    && '$PY' -c \"from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('$OUT/search-best'); print('reloaded', type(m).__name__, sum(p.numel() for p in m.parameters()))\""

# On a CPU (the dry run) small models, which check the step rather than measure streaming.
HOST_SIZE=$([ "$DEVICE" = cuda ] || echo "--hidden 256 --layers 1 --repeats 2")
# shellcheck disable=SC2086  # HOST_SIZE is options or none
step host 50 "$PY" scripts/bench_host_tier.py --device "$DEVICE" $HOST_SIZE --out "$OUT/results/bench_host_tier_$DEVICE.md"

if [ -f scripts/twin_bench.py ]; then
    step twin 35 "$PY" scripts/twin_bench.py --device "$DEVICE" --quick
else
    echo "| twin | skipped: no scripts/twin_bench.py in this checkout | 0 |" >> "$OUT/steps.md"
fi

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
    step multigpu 40 evomerge search preset=toy executor=serial optimizer=cmaes device=cuda dtype=bfloat16 \
        executor.gpus_per_worker=2 budget.evaluations=24 seed=1 run_dir="$OUT/multigpu-run"
    "$PY" - "$OUT" >> "$OUT/multigpu.log" 2>&1 <<'EOF'
import sys

from evomerge.search.run_folder import RunFolder

runs = [RunFolder(f"{sys.argv[1]}/{run}").read_evaluations() for run in ("search-run", "multigpu-run")]
one, two = ([row["scores"] for row in rows] for rows in runs)
print(f"gpus_per_worker=2: {len(two)} candidates scored on 2 GPUs; scores equal to the 1-GPU search's: {one == two}")
EOF
    tail -n 1 "$OUT/multigpu.log"
else
    echo "| multigpu | skipped: $GPUS GPU(s) on $DEVICE, 2 needed | 0 |" >> "$OUT/steps.md"
fi

echo "total $(($(date +%s) - began)) s" | tee -a "$OUT/steps.md"
# One table of it all, beside the logs (commit it as results/gpu_check_<device>.md).
"$PY" scripts/gpu_report.py "$OUT" --device "$DEVICE" --out "$OUT/gpu_check_$DEVICE.md"
cat "$OUT/steps.md"
