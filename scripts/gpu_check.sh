#!/usr/bin/env bash
# The GPU check: everything evomerge has to prove on a CUDA GPU, in one command of at most 8 minutes (its steps' limits sum to 470 s), on a
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
#             to disk; DFS and optimizers
#   bench     scripts/bench_merge.py --device cuda --dtype bfloat16 (no mergekit there: no (d) column), with
#             its seconds per candidate in each memory tier
#   memory    scripts/bench_memory.py on the device over 300 candidates (TIES, DARE-TIES)
#   search    a short toy search on the device with the serial executor, then its export, reloaded
# The tables land in OUT/results/ as *_cuda.md, and scripts/gpu_report.py gathers every step's figures into
# OUT/gpu_check_cuda.md: commit it as results/gpu_check_cuda.md.
# With DEVICE=cpu it is the same check on the CPU (a dry run in a fresh venv). The venv imitating the GPU
# machine, and the dry run (results/gpu_check_cpu_dryrun.md):
#   python3.12 -m venv /tmp/gpu312 && /tmp/gpu312/bin/python -m pip install torch==2.11.0 transformers==5.17.0 safetensors accelerate
#   PYTHON=/tmp/gpu312/bin/python bash scripts/gpu_check.sh /tmp/gpucheck-out cpu
# On a CPU the bench and memory steps (bfloat16, eager kernels before torch 2.13) need minutes more than their limits.
# Limits: on the H200 (results/gpu_check_cuda.md, 2026-12-04) tests took 44 s and memory ran out at 100 s
# after its TIES search, so memory now has 160 s and tests 120 s (119 s on this 2-core CPU).
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

step install 40 bash -c "'$PY' -m pip install --no-index --find-links .whl/gpu -r .whl/gpu/requirements.txt \
    && '$PY' -m pip install --no-index --find-links .whl/gpu --no-deps -r .whl/gpu/requirements-nodeps.txt \
    && '$PY' -m pip list"

step tests 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --durations=8 \
    tests/test_device_merge.py "tests/test_methods.py::test_runs_on_cuda_like_on_cpu" \
    tests/test_dataflow.py tests/test_optimizers.py tests/test_merge.py tests/test_memory_tiers.py

step bench 90 "$PY" scripts/bench_merge.py --device "$DEVICE" --dtype bfloat16 --repeats 5 --runs 1 \
    --work /tmp/evomerge-bench --out "$OUT/results/bench_merge_$DEVICE.md"

step memory 160 "$PY" scripts/bench_memory.py --device "$DEVICE" --dtype bfloat16 --candidates 300 \
    --searches "ties (PS),dare_ties (PS)" --out "$OUT/results/bench_memory_$DEVICE.md"

step search 60 bash -c "evomerge search preset=toy executor=serial optimizer=cmaes device=$DEVICE dtype=bfloat16 \
    budget.evaluations=24 seed=1 run_dir=$OUT/search-run \
    && evomerge export $OUT/search-run $OUT/search-best \
    && '$PY' -c \"from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('$OUT/search-best'); print('reloaded', type(m).__name__, sum(p.numel() for p in m.parameters()))\""

echo "total $(($(date +%s) - began)) s" | tee -a "$OUT/steps.md"
# One table of it all, beside the logs (commit it as results/gpu_check_<device>.md).
"$PY" scripts/gpu_report.py "$OUT" --device "$DEVICE" --out "$OUT/gpu_check_$DEVICE.md"
cat "$OUT/steps.md"
