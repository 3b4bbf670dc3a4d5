"""Compile the INT8 GEMM's autotune candidates for the benchmarked shapes, in parallel processes.

The autotuner compiles its candidate configs one after another (2-5 s each, per kernel variant);
for the benchmark's GEMM variants that is minutes of a short GPU session. Each worker here
launches the kernel once per (variant, config) it is given, with ``config=``, which fills Triton's
on-disk cache with exactly the binaries the autotuner will ask for. Timings are not taken here.

    python scripts/gpu_warm_cache.py [--workers 12]
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

    from bench_gpu_kernels import GEMMS, TOKENS
    from lra_kernels.kernels.int8_gemm import gpu_configs

    width = 768
    # the benchmark's GEMMs, in both weight layouts (k_major: the [N, K] weight's transpose)
    variants = {(M, K, N, act, res, out, k_major) for _, M, K, N, act, res, out in GEMMS for k_major in (False, True)}
    for batch in (1, 32, 256):  # the end-to-end tower's four GEMMs (qkv writes the attention dtype)
        M = batch * TOKENS
        variants |= {
            (M, width, 3 * width, "none", False, torch.float16, False),
            (M, width, width, "none", True, torch.float32, False),
            (M, width, 4 * width, "gelu", False, torch.float32, False),
            (M, 4 * width, width, "none", True, torch.float32, False),
        }
    pairs, seen = [], set()
    for v in sorted(variants, key=str):
        M, K, N, act, res, out, k_major = v
        for cfg in gpu_configs(M):
            # what makes a distinct binary: the constexprs and how the sizes specialise
            key = (act, res, out, k_major, M % 16 == 0, N % 16 == 0, K % cfg["BLOCK_K"] == 0, tuple(sorted(cfg.items())))
            if key not in seen:
                seen.add(key)
                pairs.append((v, cfg))
    return pairs


def worker(index: int, count: int) -> None:
    import torch

    from lra_kernels.kernels.int8_gemm import int8_gemm

    for (M, K, N, act, res, out_dtype, k_major), cfg in jobs()[index::count]:
        q = torch.zeros(M, K, dtype=torch.int8, device="cuda")
        wq_t = torch.zeros(N, K, dtype=torch.int8, device="cuda").t() if k_major else torch.zeros(K, N, dtype=torch.int8, device="cuda")
        ones_m, ones_n = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
        residual = torch.zeros(M, N, device="cuda") if res else None
        int8_gemm(q, wq_t, ones_m, ones_n, ones_n, act, residual, out_dtype, config=cfg)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.workers)
        return 0
    n_jobs = len(jobs())
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--workers", str(args.workers), "--worker", str(i)])
        for i in range(min(args.workers, n_jobs))
    ]
    codes = [p.wait() for p in procs]
    print(f"compiled {n_jobs} (variant, config) pairs in {time.perf_counter() - t0:.0f} s with {len(procs)} workers; exit codes {codes}")
    return max(codes, default=0)


if __name__ == "__main__":
    raise SystemExit(main())
