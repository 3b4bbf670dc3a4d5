"""Compile the Triton kernels for a GPU target without a GPU (ahead of time, through ptxas).

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic on CPU but not that they
compile: some code runs in the interpreter and fails in the compiler (or the reverse), and the
interpreter knows nothing of registers or shared memory. This script lowers every kernel variant
the package launches to PTX and a cubin for sm_90 (H100/H200) by default, checks the INT8 GEMM
uses tensor cores (``wgmma`` on sm_90, ``mma`` before) and fits in shared memory.

    python scripts/compile_check.py            # every variant (a few minutes on 2 cores)
    python scripts/compile_check.py --quick    # one variant per kernel (tests/test_triton_backend.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}

# How a launch on ViT-B/32 tensors specialises the integer arguments, as Triton's JIT would:
# arguments equal to 1 become constants, multiples of 16 get a divisibility hint (so do pointers).
SPECIALISATION = {
    # the weight as QuantLinear stores it today: wq_t[K, N] contiguous (N-major)
    "int8_gemm": (
        ("stride_qk", "stride_wn", "stride_xs", "stride_ws", "stride_bias", "stride_rn", "stride_on"),
        ("M", "N", "K", "M_BUCKET", "stride_qm", "stride_wk", "stride_rm", "stride_om"),
    ),
    # the weight stored [N, K] and passed as its transpose (K-major): what int8 wgmma wants
    "int8_gemm/k-major": (
        ("stride_qk", "stride_wk", "stride_xs", "stride_ws", "stride_bias", "stride_rn", "stride_on"),
        ("M", "N", "K", "M_BUCKET", "stride_qm", "stride_wn", "stride_rm", "stride_om"),
    ),
    "layernorm_quant": (("stride_xk", "stride_w", "stride_b", "stride_s"), ("M", "K", "stride_xm", "stride_qm")),
    "exit_head": (
        ("stride_hd", "stride_lw", "stride_lb", "stride_pe", "stride_te"),
        ("D", "E", "stride_hb", "stride_ht", "stride_pd", "stride_tc", "stride_zb"),
    ),
    "gate_features": (("stride_lc", "stride_hd", "stride_of"), ("D", "stride_hb", "stride_ht")),
}


def _jit(kernel):
    """The JITFunction under autotune/heuristics wrappers."""
    while not hasattr(kernel, "arg_names") or not hasattr(kernel, "src"):
        kernel = kernel.fn
    return kernel


def _gemm_variants(quick: bool):
    from lra_kernels.kernels.int8_gemm import _DEFAULT_GPU_CONFIG, _GPU_CONFIGS

    configs = [_DEFAULT_GPU_CONFIG] if quick else list(_GPU_CONFIGS)
    epilogues = [("fp32", "fp32", True, 0)] if quick else [("fp32", "fp32", True, 0), ("fp16", "fp16", False, 1), ("bf16", "fp32", True, 2)]
    for bm, bn, bk, stages, warps in configs:
        for out, res, has_res, act in epilogues:
            for even_k, layout in ((True, "int8_gemm"),) if quick else ((True, "int8_gemm"), (False, "int8_gemm"), (True, "int8_gemm/k-major")):
                yield (
                    layout,
                    {"q_ptr": "*i8", "w_ptr": "*i8", "residual_ptr": f"*{res}", "out_ptr": f"*{out}"},
                    dict(HAS_BIAS=True, HAS_RESIDUAL=has_res, ACTIVATION=act, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=even_k),
                    dict(num_warps=warps, num_stages=stages),
                )


def _layernorm_variants(quick: bool):
    from lra_kernels.kernels.layernorm_quant import _rows_per_program

    cases = [(1024, "fp32", True, False, False)]
    if not quick:
        cases += [(4096, "fp16", False, True, False), (1024, "fp16", False, False, True), (64, "bf16", True, False, False), (8192, "fp32", False, False, False)]
    for block_k, xdt, has_ln, smooth, static in cases:
        rows = _rows_per_program(block_k)
        yield (
            "layernorm_quant",
            {"x_ptr": f"*{xdt}", "q_ptr": "*i8"},
            dict(ROWS=rows, BLOCK_K=block_k, HAS_LN=has_ln, HAS_WEIGHT=has_ln, HAS_BIAS=has_ln, HAS_SMOOTH=smooth,
                 STATIC_SCALE=static, SCALE_BY_RECIPROCAL=True, AMAX_FLOOR=1e-12, QMAX=127),
            dict(num_warps=4 if rows * block_k <= 4096 else min(16, rows * block_k // 1024)),
        )


def _head_variants(quick: bool):
    for patch_mean, has_proj in ((True, True),) if quick else ((True, True), (False, True), (True, False)):
        e_row = 512 if has_proj else 1024
        yield (
            "exit_head",
            {"h_ptr": "*fp32"},
            dict(PATCH_MEAN=patch_mean, HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, HAS_PROJ=has_proj, BLOCK_T=4,
                 BLOCK_D=1024, BLOCK_E=8, BLOCK_E_ROW=e_row, BLOCK_C=4096 // e_row),
            dict(num_warps=8),
        )
    for hdt in ("fp32",) if quick else ("fp32", "fp16"):
        yield ("gate_features", {"h_ptr": f"*{hdt}"}, dict(BLOCK_C=1024, BLOCK_T=4, BLOCK_D=1024), dict(num_warps=8))


def _kernel(name):
    if name.startswith("int8_gemm"):
        from lra_kernels.kernels.int8_gemm import _int8_gemm_kernel as k
    elif name == "layernorm_quant":
        from lra_kernels.kernels.layernorm_quant import _layernorm_quant_kernel as k
    elif name == "exit_head":
        from lra_kernels.kernels.exit_head import _exit_head_kernel as k
    else:
        from lra_kernels.kernels.gate_features import _gate_features_kernel as k
    return _jit(k)


def compile_one(job):
    """Compile one variant; returns a result line (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, pointer_types, constexprs, options, arch = job
    fn = _kernel(name)
    ones, div16 = SPECIALISATION[name]
    constexprs = {**constexprs, **{a: 1 for a in ones}}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg.endswith("_ptr") or arg in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointer_types:
            signature[arg] = pointer_types[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        elif arg in ("eps", "logit_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    secs = time.perf_counter() - t0
    shared = compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    problems = []
    if shared > SMEM_LIMIT.get(arch, 99 * 1024):
        problems.append(f"shared memory {shared} B > {SMEM_LIMIT.get(arch)} B")
    if name.startswith("int8_gemm"):
        tensor_op = "wgmma" if arch >= 90 and constexprs["BLOCK_M"] >= 64 else "mma"
        if tensor_op not in ptx:
            problems.append(f"no {tensor_op} instruction: the int8 dot does not use tensor cores")
    shown = {k: v for k, v in {**constexprs, **options}.items() if k not in ones and k not in ("AMAX_FLOOR", "QMAX")}
    label = ", ".join(f"{k}={v}" for k, v in shown.items())
    if name.startswith("int8_gemm"):
        # pipelined async copies; byte permutes mean the int8 B tile is transposed in registers
        label += f"; cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}, prmt {ptx.count('prmt')}"
    status = "ok" if not problems else "PROBLEM: " + "; ".join(problems)
    return f"sm_{arch} {name:<18} {secs:5.1f}s smem {shared:>6} B  {status}  [{label}]", not problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one variant per kernel")
    ap.add_argument("--arch", type=int, nargs="*", default=[90], help="compute capabilities (90 = H100/H200)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    jobs = [
        (*variant, arch)
        for arch in args.arch
        for gen in (_layernorm_variants, _head_variants, _gemm_variants)
        for variant in gen(args.quick)
    ]
    ok = True
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs)))) as pool:
        for line, good in pool.map(compile_one, jobs):
            print(line, flush=True)
            ok &= good
    print(f"{len(jobs)} variants compiled, {'all fine' if ok else 'PROBLEMS above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
