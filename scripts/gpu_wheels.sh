#!/usr/bin/env bash
# Wheel folder for running evomerge's tests on a bare, offline GPU machine.
#
# What it is for: the GPU machine has Python 3.12 with torch, transformers, safetensors, accelerate and
# triton preinstalled (so also numpy, huggingface_hub, tokenizers, pyyaml, regex, tqdm, packaging,
# filelock, fsspec, jinja2/MarkupSafe, psutil, ...), no network, and a 64 MiB budget for the files sent
# to it. This script downloads everything else evomerge and its tests need, except ray and mergekit,
# as Python 3.12 manylinux x86_64 wheels into .whl/gpu/ (gitignored), and fails if they exceed 60 MiB.
#
# How to run (from the repository root, on any Linux machine with network access):
#     bash scripts/gpu_wheels.sh
# then, on the GPU machine (with .whl/gpu carried over), from the repository root:
#     python -m pip install --no-index --find-links .whl/gpu -r .whl/gpu/requirements.txt
#     python -m pip install --no-index --find-links .whl/gpu --no-deps -r .whl/gpu/requirements-nodeps.txt
#     python -m pip install --no-deps -e .
#
# To fit the budget the big wheels are slimmed after download (see "Slim" below): test suites, headers,
# Cython sources, pyarrow's Flight/S3 libraries, pillow's AVIF codec, lxml's objectify, most of
# matplotlib's fonts, and lm-eval's built-in task YAMLs except japanese_leaderboard (the one the
# mistral_ja_math preset and tests/test_presets.py name) are dropped; shared libraries lose their
# symbol tables. Built-in lm-eval benchmarks other than those are therefore not available there.
#
# Versions follow requirements/lock.txt. lm-eval is installed with --no-deps plus only what
# `lm_eval.evaluator`, `lm_eval.models.huggingface.HFLM` and `lm_eval.tasks.TaskManager` import and
# what local-JSONL loglikelihood tasks use. Left out on purpose (lazily imported or task-specific, and
# large): scikit-learn, scipy, evaluate, rouge-score, nltk, pytablewriter (+ DataProperty & co.),
# sqlitedict (only for lm-eval's CachingLM), word2number, more-itertools (vllm backends only), peft.
# requests and its deps are listed although the GPU machine usually has them (lm_eval/utils.py
# imports requests at module level; transformers 5 no longer pulls it in).
#
# Environment: PIP (default: python3 -m pip; set PIP=.venv/bin/pip to use a newer pip),
#              OUT (default: .whl/gpu), LIMIT_MIB (default: 60).
set -euo pipefail

cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
OUT=${OUT:-.whl/gpu}
LIMIT_MIB=${LIMIT_MIB:-60}

# Binary wheels (pure-Python and manylinux cp312).
WHEELS=(
  # evomerge's own dependencies
  cma==4.5.0
  optuna==5.1.0 alembic==1.20.1 SQLAlchemy==2.1.9 colorlog==6.12.0 Mako==1.4.3 MarkupSafe==3.0.4
  hydra-core==1.3.8 omegaconf==2.3.1
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1
  pillow==13.0.0 pyparsing==3.3.3 python-dateutil==2.9.0.post0 six==1.17.0
  psutil==7.2.2 threadpoolctl==3.8.0
  # tests
  pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 Pygments==2.21.0
  # lm-eval (installed with --no-deps) and what its scoring path imports
  lm_eval==0.4.13
  datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
  sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.2.0
  requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20
)
# Published as source only; pure Python, so a wheel built here works there.
SDISTS=(
  antlr4-python3-runtime==4.9.3  # omegaconf/hydra pin 4.9.*; 4.9.3 has no wheel on PyPI
)

rm -rf "$OUT"
mkdir -p "$OUT"

$PIP download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any \
  -d "$OUT" "${WHEELS[@]}"

$PIP wheel --quiet --no-deps --no-binary=:all: -w "$OUT" "${SDISTS[@]}"
rm -f "$OUT"/*.tar.gz "$OUT"/*.zip  # keep only wheels

# The lists to install there: everything but lm-eval with its dependencies resolved (they are all
# here or preinstalled there), lm-eval itself with --no-deps (see the header for what it goes without).
printf '%s\n' "${WHEELS[@]}" "${SDISTS[@]}" | grep -v '^lm_eval==' > "$OUT/requirements.txt"
printf '%s\n' "${WHEELS[@]}" | grep '^lm_eval==' > "$OUT/requirements-nodeps.txt"

# Slim: the big wheels so the folder fits the budget (111 MiB as downloaded, ~52 MiB after): drop files
# nothing here loads, strip symbol tables from shared libraries, and store the large ones LZMA-compressed
# (zip method 14; pip reads wheels with Python's zipfile, which supports it). RECORD is rewritten to match.
if ! command -v strip >/dev/null; then
  echo "gpu_wheels: 'strip' (binutils) not found; shared libraries keep their symbol tables" >&2
fi
python3 - "$OUT"/*.whl <<'PY'
"""Rewrite wheels without files evomerge and its tests never load; strip symbol tables from ELF libs."""
import base64, csv, fnmatch, hashlib, io, os, shutil, subprocess, sys, tempfile, zipfile

DROP = {
    "pyarrow": [
        "pyarrow/include/*", "pyarrow/src/*", "pyarrow/tests/*", "pyarrow/includes/*",
        "pyarrow/*.pxd", "pyarrow/*.pyx", "pyarrow/*.pxi", "pyarrow/*.h", "pyarrow/*.cc",
        "pyarrow/_flight.*", "pyarrow/libarrow_flight.so*", "pyarrow/libarrow_python_flight.so*",
        "pyarrow/_s3fs.*", "pyarrow/libarrow_s3.so*", "pyarrow/_pyarrow_cpp_tests.*",
        "pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.*.*.*",
        "pyarrow/libarrow_python_parquet_encryption.so", "pyarrow/libarrow_python_parquet_encryption.so.*.*.*",
    ],
    "pandas": ["pandas/tests/*"],
    "matplotlib": ["matplotlib/tests/*", "matplotlib/mpl-data/sample_data/*", "mpl_toolkits/*/tests/*",
                   "matplotlib/mpl-data/fonts/ttf/STIX*", "matplotlib/mpl-data/fonts/ttf/DejaVuSerif*"],
    "pillow": ["PIL/_avif.*", "pillow.libs/libavif*"],
    "lxml": [  # sacrebleu imports lxml.etree only
        "lxml/objectify.*", "lxml/html/diff.*", "lxml/html/_difflib.*",
        "lxml/includes/*", "lxml/*.pyx", "lxml/*.pxi", "lxml/*.pxd", "lxml/*.h",
    ],
    "lm_eval": ["lm_eval/tasks/*/*"],
}
KEEP = {"lm_eval": ["lm_eval/tasks/japanese_leaderboard/*"]}
STRIP = {
    "pyarrow", "pandas", "pillow", "lxml", "sqlalchemy", "kiwisolver", "fonttools", "xxhash", "psutil",
    "matplotlib", "contourpy", "charset_normalizer", "markupsafe",
}

def record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

def slim(path):
    name = os.path.basename(path).split("-")[0].lower()
    drop, strip = DROP.get(name, []), name in STRIP
    if not drop and not strip:
        return
    src = zipfile.ZipFile(path)
    record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    rows, out = [], {}
    for info in src.infolist():
        n = info.filename
        dropped = any(fnmatch.fnmatch(n, p) for p in drop) and not any(fnmatch.fnmatch(n, p) for p in KEEP.get(name, []))
        if n == record_name or dropped:
            continue
        data = src.read(info)
        if strip and data[:4] == b"\x7fELF" and shutil.which("strip"):
            with tempfile.NamedTemporaryFile(delete=False) as f:
                f.write(data)
            subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
            with open(f.name, "rb") as f2:
                data = f2.read()
            os.unlink(f.name)
        out[n] = (info, data)
        rows.append([n, record_hash(data), str(len(data))])
    rows.append([record_name, "", ""])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for n, (info, data) in out.items():
            zi = zipfile.ZipInfo(n, date_time=info.date_time)
            zi.external_attr = info.external_attr
            # Large shared libraries: LZMA (zip method 14, which pip's zipfile reads) is ~25% smaller.
            big_elf = data[:4] == b"\x7fELF" and len(data) > 1 << 20
            zi.compress_type = zipfile.ZIP_LZMA if big_elf else zipfile.ZIP_DEFLATED
            dst.writestr(zi, data, compresslevel=None if big_elf else 9)
        zi = zipfile.ZipInfo(record_name, date_time=(1980, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_DEFLATED
        dst.writestr(zi, buf.getvalue())
    before = os.path.getsize(path)
    os.replace(tmp, path)
    print(f"slimmed {os.path.basename(path)}: {before/2**20:.2f} -> {os.path.getsize(path)/2**20:.2f} MiB")

for p in sys.argv[1:]:
    slim(p)
PY

expected=$((${#WHEELS[@]} + ${#SDISTS[@]}))
got=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$got" -ne "$expected" ]; then
  echo "gpu_wheels: expected $expected wheels in $OUT, found $got" >&2
  exit 1
fi

ls -l "$OUT"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF}'
bytes=$(du -cb "$OUT" | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "gpu_wheels: $got wheels, $mib MiB in $OUT (limit $LIMIT_MIB MiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: $OUT is over $LIMIT_MIB MiB" >&2
  exit 1
fi
