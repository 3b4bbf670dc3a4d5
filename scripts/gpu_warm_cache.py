"""Compile the INT8 GEMM binaries the GPU benchmarks and the tower will ask for, in parallel processes.

The tuner compiles its candidates one after another (1-5 s each, per kernel variant); for the
benchmark's shapes and the ViT-B/32 tower at batch 1, 32, 256 that is minutes of a short GPU
session. Each worker here launches the kernel once per distinct binary (config, epilogue, layout
and how the sizes specialise) with ``config=``, which fills Triton's on-disk cache; nothing is
timed or tuned here.

    python scripts/gpu_warm_cache.py [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def jobs():
    import torch
    from bench_gpu_kernels import GEMMS, TOKENS, sweep_cases

    from lra_kernels.kernels.int8_gemm import gpu_configs

    F16, F32 = torch.float16, torch.float32
    wanted = [(M, K, N, act, res, out, True, layout, cfg) for (_, M, K, N, act, res, out), cfg, layout in sweep_cases()]
    problems = {(M, K, N, act, res, out, True) for _, M, K, N, act, res, out in GEMMS}
    for batch in (1, 32, 256):  # the tower's GEMMs with act_dtype fp16, and its INT8 patch embedding
        M = batch * TOKENS
        problems |= {(M, 768, 2304, "none", None, F16, True), (M, 768, 768, "none", F16, F16, True),
                     (M, 768, 3072, "gelu", None, F16, True), (M, 3072, 768, "none", F16, F16, True),
                     (batch * (TOKENS - 1), 3072, 768, "none", None, F32, False)}
    for M, K, N, act, res, out, bias in sorted(problems, key=str):
        wanted += [(M, K, N, act, res, out, bias, "k-major", cfg) for cfg in gpu_configs(M)]
    pairs, seen = [], set()
    for M, K, N, act, res, out, bias, layout, cfg in wanted:
        # what makes a distinct binary: the constexprs and how the integer arguments specialise
        key = (act, str(res), str(out), bias, layout, M % 16 == 0, N % 16 == 0, K % 16 == 0,
               K % cfg["BLOCK_K"] == 0, tuple(sorted(cfg.items())))
        if key not in seen:
            seen.add(key)
            pairs.append(((M, K, N, act, res, out, bias, layout), cfg))
    return pairs


def worker(index: int, count: int) -> None:
    import torch

    from lra_kernels.kernels.int8_gemm import int8_gemm

    for (M, K, N, act, res, out_dtype, bias, layout), cfg in jobs()[index::count]:
        q = torch.zeros(M, K, dtype=torch.int8, device="cuda")
        w = torch.zeros(N, K, dtype=torch.int8, device="cuda")
        if layout == "strided":
            w = w.t().contiguous().t()
        ones_m, ones_n = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
        residual = torch.zeros(M, N, device="cuda", dtype=res) if res is not None else None
        int8_gemm(q, w, ones_m, ones_n, ones_n if bias else None, act, residual, out_dtype, config=cfg)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.workers)
        return 0
    n_jobs = len(jobs())
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--workers", str(args.workers), "--worker", str(i)])
             for i in range(min(args.workers, n_jobs))]
    codes = [p.wait() for p in procs]
    print(f"compiled {n_jobs} distinct GEMM binaries in {time.perf_counter() - t0:.0f} s with {len(procs)} workers; "
          f"exit codes {codes}")
    return max(codes, default=0)


if __name__ == "__main__":
    raise SystemExit(main())
