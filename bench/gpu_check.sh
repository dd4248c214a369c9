#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine with no internet (see DEVELOPERS notes in
# bench/README.md). From the repository root:
#
#   bash bench/gpu_check.sh            # results under bench/results/ (and $OUT when set)
#
# 1. builds moefast._C with its CUDA sources for the local GPU (ptxas report kept);
# 2. runs the `cuda` tests, then the whole CPU suite's op tests;
# 3. runs compute-sanitizer memcheck and racecheck over bench/sanitizer_driver.py;
# 4. runs the benchmarks: `python -m moefast.bench` (full set) and the CUDA pytest-benchmark suite;
# 5. writes bench/results/gpu_check-<device>-<date>.json: device, torch and CUDA versions, commit,
#    date and each step's outcome, with the logs beside it.
# Every step runs even if an earlier one failed; the exit code is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results=bench/results
mkdir -p "$results"
logs=$(mktemp -d)
declare -A status

run_step() {  # name, command...
  local name=$1
  shift
  echo "==== $name"
  local start=$SECONDS
  if "$@" >"$logs/$name.log" 2>&1; then status[$name]="pass"; else status[$name]="FAIL"; fi
  echo "     ${status[$name]} in $((SECONDS - start)) s; last lines:"
  tail -n 6 "$logs/$name.log" | sed 's/^/     /'
}

# The tensor-core grouped GEMM needs the CUTLASS headers of the nvidia-cutlass wheel. The GPU
# machine has no internet: carry the wheel in .whl/ (see bench/README.md) and it is unpacked here.
if ! $PY -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("cutlass_library") is None)'; then
  wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/moefast-cutlass "$wheel"
    export MOEFAST_CUTLASS_INCLUDE=/tmp/moefast-cutlass/cutlass_library/source/include
  fi
fi
export MOEFAST_REQUIRE_CUTLASS=${MOEFAST_REQUIRE_CUTLASS:-1}
arch=$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}" + ("a" if p[0] == 9 else ""))')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MOEFAST_CUDA=1 MOEFAST_PTXAS_VERBOSE=1
run_step build env MAX_JOBS="$(nproc)" $PY setup.py build_ext --inplace
grep -E "spill (stores|loads)" "$logs/build.log" | sort | uniq -c >"$logs/ptxas-spills.txt" || true

run_step cuda_tests $PY -m pytest -q -m cuda tests -p no:cacheprovider
run_step cpu_tests $PY -m pytest -q tests/test_ops.py tests/test_routing.py tests/test_errors.py -p no:cacheprovider

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
run_step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitizer_driver.py
run_step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY bench/sanitizer_driver.py
unset PYTORCH_NO_CUDA_MEMORY_CACHING

run_step bench_cuda_suite $PY -m pytest bench/test_bench_cuda.py -q -p no:cacheprovider \
  --benchmark-json "$results/bench-cuda-suite-$stamp.json"
run_step bench_command $PY -m moefast.bench --out "$results/bench-$stamp.json"

summary="$results/gpu_check-$stamp.json"
STATUS="$(for k in "${!status[@]}"; do echo "$k=${status[$k]}"; done)" LOGS="$logs" $PY - "$summary" <<'PY'
import json, os, subprocess, sys, datetime
import torch
steps = dict(line.split("=", 1) for line in os.environ["STATUS"].split())
def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
props = torch.cuda.get_device_properties(0)
out = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "commit": git("rev-parse", "HEAD"),
    "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "multiprocessors": props.multi_processor_count,
               "memory_gib": round(props.total_memory / 2**30, 1)},
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "steps": steps,
    "ptxas_spills": open(os.path.join(os.environ["LOGS"], "ptxas-spills.txt")).read().splitlines(),
}
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
PY
cp "$logs"/*.log "$results/" 2>/dev/null || true
if [ -n "${OUT:-}" ]; then cp "$summary" "$results"/bench-*"$stamp"*.json "$OUT/" 2>/dev/null || true; fi
for k in "${!status[@]}"; do [ "${status[$k]}" = pass ] || exit 1; done
exit 0
