#!/usr/bin/env bash
# A search on the Ray cluster of cluster.yaml, run on its head node (`ray attach scripts/cluster/cluster.yaml`).
# One worker per GPU of the whole cluster, each holding the sources in bfloat16 on its GPU.
# Paths are on the shared file system: every node reads the models and tasks itself.
# Kill it at any time; `evomerge resume /shared/runs/my-merge` continues where the checkpoint left off.
set -euo pipefail
EVOMERGE=/shared/evomerge/.venv/bin/evomerge

"$EVOMERGE" search \
  executor=ray executor.address=auto executor.timeout_s=1800 executor.max_tries=3 \
  device=cuda dtype=bfloat16 \
  run_dir=/shared/runs/my-merge \
  models.base=/shared/models/base \
  'models.experts=[/shared/models/math,/shared/models/code]' \
  method=ties genome.layer_groups=4 \
  'tasks.names=[my_math_val,my_code_val]' tasks.include_path=/shared/tasks tasks.limit=200 \
  'objectives=[{name: mean, terms: {my_math_val/acc: 0.5, my_code_val/acc: 0.5}}]' \
  optimizer=cmaes optimizer.popsize=16 budget.evaluations=800 seed=1 \
  "$@"
