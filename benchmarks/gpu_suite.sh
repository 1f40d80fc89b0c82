#!/usr/bin/env bash
# Every GPU benchmark figure from one command, within a time budget, never stopping at
# the first failure. See benchmarks/README.md ("GPU suite") and docs/benchmarks.md
# ("GPU suite rows": each row, its target and its timeout).
#
# Order: a preflight first (benchmarks/gpu/preflight.py, one screen: torch/CUDA, GPUs and
# free memory, nvcc vs torch CUDA, ninja, every row's modules; then RUN or SKIP per row
# and why; also DIR/preflight.json), then the rows, each under its own `timeout`: env,
# build_ext (the CUDA extension, built in a temp dir before any timed row), the timed rows.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [--out DIR] [--budget-s N] [--rows a,b,...]
#                                [--workdir DIR] [--keep-workdir]
#
#   --dry-run     every row's code path on CPU with tiny sizes (Triton interpreter, no
#                 CUDA, no in-place build): checks the suite itself in about a minute
#   --out DIR     results: rows/*.json, logs/, summary.json, benchmarks_gpu.md
#                 (default benchmarks/results/gpu, or benchmarks/results/gpu-dry-run)
#   --budget-s N  total seconds from this script's start, set-up included (default 480)
#   --rows LIST   run only these rows (e.g. to rerun failed ones into the same --out)
#
# Python: $PYTHON if set; else the first of .venv/bin/python,
# benchmarks/.cache/gpu-venv/bin/python, python3 whose torch sees a GPU (for --dry-run:
# whose torch imports). A lent GPU machine usually has a CUDA torch installed
# system-wide: it is used as it is, nothing is installed. Only when none is found on a
# machine that has a GPU (nvidia-smi -L lists one) is a venv created at
# benchmarks/.cache/gpu-venv (system site packages visible) with "$TORCH_SPEC" (default
# torch==2.13.0, as the Makefile; TORCH_INDEX_URL selects a CUDA wheel index) and the
# runtime dependencies; that needs network access. Without a GPU, any Python whose torch
# imports is used: the preflight then says "no CUDA" and the GPU rows are skipped.
#
# Exit code: 0 all rows ok or skipped; 1 some row failed (reports still written);
# 2 usage error or no usable Python/torch.
set -u
T0=$(date +%s.%N)
ORIG_ARGS="$*"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY=0
OUT=""
BUDGET=480
ROWS=""
PASS=()
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --budget-s) BUDGET="${2:?--budget-s needs seconds}"; shift ;;
    --rows) ROWS="${2:?--rows needs a list}"; shift ;;
    --workdir) PASS+=(--workdir "${2:?--workdir needs a directory}"); shift ;;
    --keep-workdir) PASS+=(--keep-workdir) ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="benchmarks/results/gpu-dry-run"; else OUT="benchmarks/results/gpu"; fi
fi

# A Python whose torch is good enough: sees a GPU, or (dry run) merely imports.
usable() {
  local py="$1"
  [ -x "$py" ] || py="$(command -v "$py" 2>/dev/null)" || return 1
  [ -n "$py" ] || return 1
  if [ "$DRY" = 1 ]; then
    "$py" -c 'import torch' >/dev/null 2>&1
  else
    "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1
  fi
}

GPU_VENV="$ROOT/benchmarks/.cache/gpu-venv"
PY=""
if [ -n "${PYTHON:-}" ]; then
  usable "$PYTHON" && PY="$PYTHON"
  [ -n "$PY" ] || echo "gpu_suite.sh: \$PYTHON=$PYTHON has no usable torch; looking further" >&2
fi
if [ -z "$PY" ]; then
  for cand in "$ROOT/.venv/bin/python" "$GPU_VENV/bin/python" python3 python; do
    if usable "$cand"; then PY="$cand"; break; fi
  done
fi
has_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } ||
    [ -e /dev/nvidia0 ]
}
if [ -z "$PY" ] && [ "$DRY" = 0 ] && ! has_gpu; then
  # No GPU here: any torch will do; the preflight reports "no CUDA" and skips the GPU rows.
  echo "gpu_suite.sh: no GPU on this machine; the preflight will skip the GPU rows" >&2
  for cand in "$ROOT/.venv/bin/python" "$GPU_VENV/bin/python" python3 python; do
    if DRY=1 usable "$cand"; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ] && [ "$DRY" = 0 ]; then
  # No CUDA torch anywhere: make one (needs network; a lent machine normally has torch).
  echo "gpu_suite.sh: no Python with a CUDA torch found; creating $GPU_VENV" >&2
  BASE_PY="$(command -v python3 || command -v python)"
  if [ -n "$BASE_PY" ] && "$BASE_PY" -m venv --system-site-packages "$GPU_VENV"; then
    PIP=("$GPU_VENV/bin/python" -m pip install -q)
    [ -n "${TORCH_INDEX_URL:-}" ] && PIP+=(--extra-index-url "$TORCH_INDEX_URL")
    "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}" numpy pyyaml safetensors sentencepiece \
      tokenizers zstandard tqdm triton pybind11 ninja setuptools wheel >&2 || true
    usable "$GPU_VENV/bin/python" && PY="$GPU_VENV/bin/python"
  fi
fi
if [ -z "$PY" ]; then
  # Still show what is there (the preflight needs only the standard library).
  BASE_PY="$(command -v python3 || command -v python)"
  if [ -n "$BASE_PY" ]; then
    PRE=("$BASE_PY" "$ROOT/benchmarks/gpu/preflight.py")
    [ "$DRY" = 1 ] && PRE+=(--dry-run)
    if command -v timeout >/dev/null 2>&1; then timeout -k 3 60 "${PRE[@]}"; else "${PRE[@]}"; fi
  fi
  echo "gpu_suite.sh: no usable Python/torch (dry run: torch must import; real run:" \
    "torch.cuda.is_available()). Set PYTHON=/path/to/python." >&2
  exit 2
fi
echo "gpu_suite.sh: using $PY" >&2

ARGS=(--out "$OUT" --budget-s "$BUDGET" --t0 "$T0" --command "bash benchmarks/gpu_suite.sh${ORIG_ARGS:+ $ORIG_ARGS}")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
[ -n "$ROWS" ] && ARGS+=(--rows "$ROWS")
exec "$PY" "$ROOT/benchmarks/gpu/suite.py" "${ARGS[@]}" ${PASS[@]+"${PASS[@]}"}
