#!/usr/bin/env bash
# Compile-checks the CUDA extension on a machine without a GPU, so that a GPU session never starts
# with code that does not build. torch 2.14.1 (a CUDA 13.0 build, from local disk) goes into
# .venv-cuda; nvcc comes from /usr/local/cuda. Fails on a compile error, a compile warning in
# csrc/cuda/, or a register spill reported by ptxas; then imports the built extension and checks
# that every op has a CUDA kernel registered. Nothing runs on a GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build_check: no nvcc at $CUDA_HOME/bin/nvcc; skipped" >&2
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.14.1 numpy ninja pybind11 setuptools wheel
# The CUTLASS/CuTe headers of the tensor-core grouped GEMM (a pure-header wheel; its Python deps are
# not needed for the headers).
"$VENV/bin/pip" install --quiet --no-deps nvidia-cutlass==4.2.0.0
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" CPATH="$SITE/nvidia/cu13/include"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}" MOEFAST_CUDA=1 MOEFAST_PTXAS_VERBOSE=1 MOEFAST_REQUIRE_CUTLASS=1
mkdir -p build/cuda  # ninja rebuilds what changed
log=build/cuda/build.log
echo "cuda_build_check: building with $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'),"\
  "arch list $TORCH_CUDA_ARCH_LIST (log: $log)"
if ! MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build --build-base build/cuda >"$log" 2>&1; then
  grep -E "error" -A3 "$log" | head -60
  echo "cuda_build_check: the CUDA build failed" >&2
  exit 1
fi
status=0
spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
if [ -n "$spills" ]; then
  echo "cuda_build_check: ptxas reports register spills:" >&2
  grep -B2 -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" | head -40 >&2
  status=1
fi
warnings=$(grep -iE "csrc/cuda/[^ ]*(\([0-9]+\)|:[0-9]+:[0-9]+:).*warning" "$log" || true)
if [ -n "$warnings" ]; then
  echo "cuda_build_check: compile warnings in csrc/cuda/:" >&2
  echo "$warnings" | head -40 >&2
  status=1
fi
echo "cuda_build_check: $(grep -c 'Compiling entry function' "$log") kernel instantiations compiled, no spills reported: $([ -z "$spills" ] && echo yes || echo no)"
lib=$(ls -d build/cuda/lib*)
(cd "$lib" && "$OLDPWD/$VENV/bin/python" - <<'PY'
import torch
import moefast
assert moefast._C.with_cuda, "the extension was built without its CUDA sources"
assert moefast._C.with_cutlass, "the extension was built without the CUTLASS grouped GEMM"
ops = ["router", "router_backward", "routing_plan", "permute", "unpermute",
       "unpermute_weight_grad", "grouped_mm", "grouped_mm_act", "grouped_mm_weight_grad",
       "grouped_bias_grad", "mixture", "mixture_backward", "swiglu", "swiglu_backward",
       "grouped_swiglu_mlp", "grouped_swiglu_mlp_backward", "tree_route"]
registered = [n for n in dir(torch.ops.moefast)
              if isinstance(getattr(torch.ops.moefast, n, None), torch._ops.OpOverloadPacket)]
assert set(registered) <= set(ops), f"ops missing from this check: {sorted(set(registered) - set(ops))}"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"moefast::{op}", "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"cuda_build_check: imported moefast with torch {torch.__version__}; CUDA kernels for {len(ops)} ops")
PY
) || status=1
exit $status
