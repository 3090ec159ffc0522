#!/usr/bin/env bash
# bench/cuda.sh --wheels DIR --out DIR [--quick] [-- BENCHMARK ARGS...]
#
# Everything a CUDA machine should measure, in one call: `pytest -m gpu`, then `python bench/throughput.py
# --preset base` (which includes the transfer sweep), writing at most 8 files into --out (copy them into results/
# afterwards). For machines with an older torch and no network: the packages mmload needs beyond torch,
# transformers, numpy and pillow are installed from the wheels in --wheels with --no-index (README: "Running the
# benchmark on a CUDA machine" says how to make that folder). Without CUDA, the GPU tests are skipped and the
# benchmark runs with --quick on the CPU, so that this script is tested where CI runs.
set -euo pipefail

usage() { echo "usage: bench/cuda.sh --wheels DIR --out DIR [--quick] [-- BENCHMARK ARGS...]" >&2; exit 2; }
wheels="" out="" quick=0
while (($#)); do
  case "$1" in
    --wheels) [[ $# -ge 2 ]] || usage; wheels="$2"; shift 2 ;;
    --out) [[ $# -ge 2 ]] || usage; out="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/cuda.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n "$wheels" && -n "$out" ]] || usage
[[ -d "$wheels" ]] || { echo "bench/cuda.sh: --wheels $wheels is not a folder" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ -n "$(ls -A "$out")" ]]; then
  echo "bench/cuda.sh: --out $out is not empty: give a new or empty folder (at most 8 files come back)" >&2
  exit 2
fi
log="$out/cuda-sh.log"
started=$SECONDS
say() { echo "[cuda.sh $((SECONDS - started)) s] $*" | tee -a "$log"; }
: >"$log"

shopt -s nullglob
found=("$wheels"/*.whl)
if ((${#found[@]})); then
  site="$(mktemp -d)"
  trap 'rm -rf "$site"' EXIT
  say "installing ${#found[@]} wheel(s) from $wheels into $site (--no-index)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site" "${found[@]}" 2>&1 | tee -a "$log"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no wheels in $wheels: using what this Python has"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import webdataset, torchdata, braceexpand, mmload" 2>>"$log" || {
  say "mmload cannot be imported here: give --wheels a folder with webdataset, torchdata and braceexpand wheels"
  exit 1
}

cd "$repo"
if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "CUDA: $("$python" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)")"
  say "pytest -m gpu"
  set +e
  "$python" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log"
  tests=${PIPESTATUS[0]}
  set -e
  say "pytest -m gpu exited $tests"
  bench=(--preset base)
  ((quick)) && bench=(--quick --device cuda)
else
  say "no CUDA here: pytest -m gpu skipped; the benchmark runs with --quick on the CPU"
  tests=0
  bench=(--quick)
fi
say "python bench/throughput.py ${bench[*]} $*"
set +e
"$python" bench/throughput.py "${bench[@]}" --no-progress --out "$out" "$@" 2>&1 | tee -a "$log"
benchmark=${PIPESTATUS[0]}
set -e
say "the benchmark exited $benchmark; files in $out:"
(cd "$out" && find . -type f | sort) | tee -a "$log"
files=$(find "$out" -type f | wc -l)
if ((files > 8)); then
  say "$files files in $out: more than the 8 a device call brings back"
  exit 1
fi
((tests == 0 && benchmark == 0)) || exit 1
