#!/usr/bin/env bash
# GPU check of the Triton backend, in one short run on a CUDA machine:
#   1. the kernel tests (tests/test_kernel_*.py, tests/test_triton_backend.py) on CUDA tensors,
#      with the INT8 GEMM autotuner off (one config; every candidate config is swept by its own test);
#   2. every other test marked `gpu`;
#   3. the GPU benchmarks (bench/bench_gpu_kernels.py, autotuner on);
#   4. a summary table (scripts/gpu_summary.py).
#
# Usage, from the repository root (torch + triton present, no internet needed):
#   ../shared/gpu-wheels.sh            # on a machine with a package index: wheels into .whl/
#   scripts/gpu_check.sh               # on the GPU machine (installs .whl/*.whl into /tmp/site)
#
# Results go to $OUT when set (else /tmp/gpu-check-out): summary.txt, bench.jsonl, bench.json,
# *.xml (JUnit) and one log per phase. The whole run stays within GPU_CHECK_BUDGET seconds
# (default 540); GPU_CHECK_PHASES (default "tests gpu-tests bench") picks phases to rerun.
# GPU_CHECK_DRY_RUN=1: rehearse the whole script on CPU (Triton interpreter, tiny benchmark shapes).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

RESULTS="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
PHASES="${GPU_CHECK_PHASES:-tests gpu-tests bench}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    export TRITON_INTERPRET=1 LRA_BENCH_DEVICE=cpu
    echo "DRY RUN on CPU: the Triton interpreter, tiny shapes; no figure below means anything"
else
    unset TRITON_INTERPRET  # compiled kernels on the GPU
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "note: no .whl/*.whl here; open_clip must already be importable (../shared/gpu-wheels.sh fetches it)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - << 'EOF' 2>&1 | tee "$RESULTS/preflight.log"
import importlib
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
import os
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_DRY_RUN") != "1":
    raise SystemExit("no CUDA device: this script is for the GPU machine (CPU checks: pytest tests)")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "pytest", "pytest_benchmark", "open_clip", "numpy", "safetensors", "torchao"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<17} {getattr(mod, '__version__', 'ok')}")
    except Exception as err:
        print(f"  {name:<17} MISSING ({type(err).__name__}: {err})")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$RESULTS/preflight.log" || true

overall=0
# phase LABEL BUDGET_SECONDS command... : runs under timeout, logs, keeps going on failure
phase() {
    local label=$1 budget=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 20))
    if ((left < 30)); then
        echo "=== $label: skipped, the time budget is spent" | tee "$RESULTS/$label.log"
        overall=1
        return
    fi
    ((budget > left)) && budget=$left
    echo "=== $label (at most ${budget}s)"
    local t0=$SECONDS rc
    set +e
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$RESULTS/$label.log"
    rc=${PIPESTATUS[0]}
    set -e
    # pytest: 5 = nothing selected (no other gpu-marked tests) is fine
    if ((rc == 5)); then rc=0; fi
    echo "=== $label: exit $rc after $((SECONDS - t0))s" | tee -a "$RESULTS/$label.log"
    ((rc != 0)) && overall=1
    return 0
}

KERNEL_TESTS=(tests/test_kernel_layernorm_quant.py tests/test_kernel_int8_gemm.py tests/test_kernel_exit_head.py
    tests/test_kernel_gate_features.py tests/test_triton_backend.py)
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)

if [[ " $PHASES " == *" tests "* ]]; then
    phase kernel-tests 240 env LRA_TRITON_AUTOTUNE=0 "${PYTEST[@]}" "${KERNEL_TESTS[@]}" \
        --junitxml="$RESULTS/kernel-tests.xml"
fi
if [[ " $PHASES " == *" gpu-tests "* ]]; then
    ignores=()
    for f in "${KERNEL_TESTS[@]}"; do ignores+=(--ignore="$f"); done
    phase gpu-tests 90 "${PYTEST[@]}" tests -m gpu "${ignores[@]}" --junitxml="$RESULTS/gpu-tests.xml"
fi
if [[ " $PHASES " == *" bench "* ]]; then
    rm -f "$RESULTS/bench.jsonl"
    bench_json=()
    if "$PY" -c "import pytest_benchmark" 2> /dev/null; then
        bench_json=(--benchmark-json="$RESULTS/bench.json" --benchmark-columns=min,median,rounds)
    fi
    phase bench 300 env LRA_GPU_BENCH_JSONL="$RESULTS/bench.jsonl" "${PYTEST[@]}" bench/bench_gpu_kernels.py \
        "${bench_json[@]}" --junitxml="$RESULTS/bench.xml"
fi

echo
"$PY" scripts/gpu_summary.py --bench "$RESULTS/bench.jsonl" --out "$RESULTS/summary.txt" \
    --tests "kernel tests (CUDA)=$RESULTS/kernel-tests.xml" "other gpu tests=$RESULTS/gpu-tests.xml" \
    "benchmarks ran=$RESULTS/bench.xml" || overall=1
echo "(results in $RESULTS)"
exit $overall
