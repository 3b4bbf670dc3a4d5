"""Compile the Triton kernels for a GPU target without a GPU (ahead of time, through ptxas) and read the result.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic on CPU but not what they compile
to. This script lowers every kernel variant the package launches on ViT-B tensors to PTX and a
cubin for sm_90 (H100/H200), reads the cubin's resource usage and SASS with the ``cuobjdump`` that
ships inside Triton, and prints one line per variant: registers, spills, shared memory, CTAs per
SM, and instruction counts. It fails (exit 1) when

- any variant needs more shared memory than an SM has, or spills to local memory;
- an INT8 GEMM variant has no int8 ``wgmma`` (``IGMMA`` in SASS), loads its operands neither
  through TMA (``cp.async.bulk.tensor``) nor through 16-byte ``cp.async``, has a narrower
  ``cp.async`` or a byte-wide global load, or its config claims more CTAs per SM than fit.

    python scripts/compile_check.py                 # every variant (minutes on 2 cores; --jobs N)
    python scripts/compile_check.py --quick         # one variant per kernel (tests/lra_kernels/ops/test_triton_ops.py)
    python scripts/compile_check.py --self-test     # known-bad variants: exit 0 only if each is flagged
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SM = {90: dict(smem=228 * 1024, smem_block=227 * 1024, regs=65536, threads=2048, ctas=32)}
SASS_OPS = ("IGMMA", "HGMMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDG", "STG", "LDSM", "LDL", "STL")
# How a launch on ViT-B tensors specialises the integer arguments, as Triton's JIT would: arguments
# equal to 1 become constants; multiples of 16 (and pointers) get a divisibility hint. M = batch * 50
# is not assumed to be a multiple of 16.
GEMM_ONES = ("stride_qk", "stride_wk", "stride_xs", "stride_ws", "stride_bias", "stride_rn", "stride_on")
GEMM_DIV16 = ("N", "K", "stride_qm", "stride_wn", "stride_rm", "stride_om")
EPILOGUES = {  # name: (out, residual or None, activation code): as the block calls the four GEMMs
    "qkv": ("fp16", None, 0),
    "res": ("fp16", "fp16", 0),
    "gelu": ("fp16", None, 1),
    "f32-quick_gelu-res": ("fp32", "fp32", 3),
    "bf16-res": ("bf16", "bf16", 0),
}


def _jit(kernel):
    """The JITFunction under autotune/heuristics wrappers."""
    while not hasattr(kernel, "arg_names") or not hasattr(kernel, "src"):
        kernel = kernel.fn
    return kernel


def _job(name, kernel, types, constexprs, options, ones=(), div16=(), label="", gemm=False, ctas=None,
         staged_bytes=0):
    return dict(name=name, kernel=kernel, types=types, constexprs=constexprs, options=options, ones=ones,
                div16=div16, label=label, gemm=gemm, ctas=ctas, staged_bytes=staged_bytes)


def gemm_jobs(quick: bool):
    from lra_kernels.kernels.int8_gemm import DEFAULT_SMALL_M, TILED_CONFIGS
    from lra_kernels.kernels.int8_gemm_persistent import PERSISTENT_CONFIGS

    tiled = [DEFAULT_SMALL_M] if quick else list(TILED_CONFIGS)
    persistent = [PERSISTENT_CONFIGS[2]] if quick else list(PERSISTENT_CONFIGS)
    epilogues = ["res"] if quick else list(EPILOGUES)
    for bm, bn, bk, stages, warps, ctas in tiled:
        for epi in epilogues:
            for even_k in (True,) if quick or epi != "res" else (True, False):
                yield tiled_job(bm, bn, bk, stages, warps, epi, even_k=even_k, ctas=ctas)
    for cfg in persistent:
        for epi in epilogues:
            yield persistent_job(cfg, epi)


def tiled_job(bm, bn, bk, stages, warps, epi, even_k=True, k_major=True, ctas=1):
    """A tiled-kernel variant; ``k_major=False`` compiles the weight read N-major (strides ``(1, N)``)."""
    out, res, act = EPILOGUES[epi]
    ones, div16 = GEMM_ONES, GEMM_DIV16
    if not k_major:
        swap = {"stride_wk": "stride_wn", "stride_wn": "stride_wk"}
        ones = tuple(swap.get(a, a) for a in ones)
        div16 = tuple(swap.get(a, a) for a in div16)
    types = {"q_ptr": "*i8", "w_ptr": "*i8", "residual_ptr": f"*{res or out}", "out_ptr": f"*{out}"}
    constexprs = dict(HAS_BIAS=True, HAS_RESIDUAL=res is not None, ACTIVATION=act, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=bk, GROUP_M=8, EVEN_K=even_k, K_MAJOR=k_major)
    label = f"tiled {bm}x{bn}x{bk} s{stages} w{warps} ctas{ctas} {epi}{'' if even_k else ' ragged-K'}"
    label += "" if k_major else " N-major"
    return _job("int8_gemm", "tiled", types, constexprs, dict(num_warps=warps, num_stages=stages), ones, div16,
                label, gemm=True, ctas=ctas, staged_bytes=(bm + bn) * bk * stages)


def persistent_job(cfg, epi):
    out, res, act = EPILOGUES[epi]
    bm, bn, bk, sub = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["EPILOGUE_SUBTILE"]
    types = {"q_desc": f"tensordesc<i8[{bm}, {bk}]>", "w_desc": f"tensordesc<i8[{bn}, {bk}]>",
             "out_desc": f"tensordesc<{out}[{bm}, {bn // sub}]>",
             "residual_desc": f"tensordesc<{res or out}[{bm}, {bn // sub}]>"}
    constexprs = dict(HAS_BIAS=True, HAS_RESIDUAL=res is not None, ACTIVATION=act, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EPILOGUE_SUBTILE=sub)
    label = (f"persistent {bm}x{bn}x{bk} s{cfg['num_stages']} w{cfg['num_warps']} sub{sub} "
             f"ctas{cfg['CTAS_PER_SM']} {epi}")
    return _job("int8_gemm", "persistent", types, constexprs,
                dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                ("stride_xs", "stride_ws", "stride_bias"), ("N", "K"), label, gemm=True, ctas=cfg["CTAS_PER_SM"])


def other_jobs(quick: bool):
    from lra_kernels.kernels.exit_head import BLOCK_B, HEAD_WARPS, head_blocks
    from lra_kernels.kernels.gate_features import gate_blocks
    from lra_kernels.kernels.layernorm_quant import _rows_per_program

    cases = [(1024, "fp32", True, False, False)]
    if not quick:
        cases += [(1024, "fp16", True, False, False), (4096, "fp16", False, True, False),
                  (1024, "fp16", False, False, True), (1024, "bf16", True, False, False)]
    for block_k, xdt, has_ln, smooth, static in cases:
        rows = _rows_per_program(block_k)
        yield _job("layernorm_quant", "layernorm_quant", {"x_ptr": f"*{xdt}", "q_ptr": "*i8"},
                   dict(ROWS=rows, BLOCK_K=block_k, HAS_LN=has_ln, HAS_WEIGHT=has_ln, HAS_BIAS=has_ln,
                        HAS_SMOOTH=smooth, STATIC_SCALE=static, SCALE_BY_RECIPROCAL=True, AMAX_FLOOR=1e-12, QMAX=127),
                   dict(num_warps=4 if rows * block_k <= 4096 else min(16, rows * block_k // 1024)),
                   ("stride_xk", "stride_w", "stride_b", "stride_s"), ("M", "K", "stride_xm", "stride_qm"),
                   f"{xdt} K<={block_k} ln={has_ln} smooth={smooth} static={static}")
    heads = [("fp16", True, True)] if quick else [("fp16", True, True), ("fp32", True, True), ("fp16", False, True),
                                                  ("fp16", True, False)]
    for hdt, patch_mean, has_proj in heads:
        D, E, C = 768, 512 if has_proj else 768, 1000
        blocks = head_blocks(D, E, C)
        yield _job("exit_head", "exit_head", {"h_ptr": f"*{hdt}"},
                   dict(PATCH_MEAN=patch_mean, HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, HAS_PROJ=has_proj, **blocks),
                   dict(num_warps=HEAD_WARPS),
                   ("stride_hd", "stride_lw", "stride_lb", "stride_pe", "stride_te", "stride_sd"),
                   ("D", "E", "stride_hb", "stride_ht", "stride_pd", "stride_tc", "stride_sb", "stride_zb"),
                   f"{hdt} B-tile {BLOCK_B} D={D} E={E} C={C} patch_mean={patch_mean} proj={has_proj}")
    for hdt in ("fp16",) if quick else ("fp16", "fp32", "bf16"):
        blocks = gate_blocks(1000, 50, 768)
        warps = blocks.pop("num_warps")
        yield _job("gate_features", "gate_features", {"h_ptr": f"*{hdt}"}, blocks, dict(num_warps=warps),
                   ("stride_lc", "stride_hd", "stride_of"), ("D", "stride_hb", "stride_ht"), f"{hdt} C=1000 D=768")


def _kernel(kind):
    if kind == "tiled":
        from lra_kernels.kernels.int8_gemm import _int8_gemm_kernel as k
    elif kind == "persistent":
        from lra_kernels.kernels.int8_gemm_persistent import _int8_gemm_persistent_kernel as k
    elif kind == "layernorm_quant":
        from lra_kernels.kernels.layernorm_quant import _layernorm_quant_kernel as k
    elif kind == "exit_head":
        from lra_kernels.kernels.exit_head import _exit_head_kernel as k
    else:
        from lra_kernels.kernels.gate_features import _gate_features_kernel as k
    return _jit(k)


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(cubin: bytes) -> dict:
    """Registers, stack/local bytes and SASS opcode counts of a cubin (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res.stdout))
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = {op: sum(1 for o in ops if o == op) for op in SASS_OPS}
    return dict(regs=int(usage.get("REG", 0)), stack=int(usage.get("STACK", 0)), local=int(usage.get("LOCAL", 0)),
                sass=counts)


def read_ptx(ptx: str) -> dict:
    sizes = [int(s, 0) for s in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s+\[[^\]]+\],\s*"
                                           r"\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)]
    return dict(
        wgmma_s8=len(re.findall(r"wgmma\.mma_async\S*\.s8\.s8", ptx)),
        cp_async_sizes=sizes,
        tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared\S*\.global", ptx)),
        byte_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.[bus]8\b", ptx)),
    )


def occupancy(arch: int, regs: int, warps: int, shared: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256) and shared memory."""
    sm = SM[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = sm["regs"] // (per_warp * warps)
    by_smem = sm["smem"] // (shared + 1024)  # 1 KiB reserved per CTA
    return max(0, min(by_regs, by_smem, sm["ctas"], sm["threads"] // (32 * warps)))


def compile_one(job):
    """Compile one variant for ``job["arch"]``; returns ``(line, ok)`` (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = job["arch"]
    fn = _kernel(job["kernel"])
    constexprs = {**job["constexprs"], **{a: 1 for a in job["ones"]}}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        if (arg.endswith("_ptr") or arg in job["div16"]) and not arg.endswith("_desc"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if arg in job["types"]:
            signature[arg] = job["types"][arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        elif arg in ("eps", "logit_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=job["options"])
    secs = time.perf_counter() - t0
    shared = compiled.metadata.shared
    cub, ptx = read_cubin(compiled.asm["cubin"]), read_ptx(compiled.asm["ptx"])
    warps = job["options"].get("num_warps", 4)
    ctas = occupancy(arch, cub["regs"], warps, shared)
    problems = []
    if shared > SM[arch]["smem_block"]:
        problems.append(f"shared memory {shared} B > {SM[arch]['smem_block']} B")
    if cub["stack"] or cub["local"] or cub["sass"]["LDL"] or cub["sass"]["STL"]:
        problems.append(f"spills: stack {cub['stack']} B, local {cub['local']} B, LDL/STL "
                        f"{cub['sass']['LDL']}/{cub['sass']['STL']}")
    if job["gemm"]:
        if not ptx["wgmma_s8"] or not cub["sass"]["IGMMA"]:
            problems.append("no int8 wgmma (IGMMA): the dot does not use Hopper's tensor-core path")
        if not ptx["tma_loads"] and not ptx["cp_async_sizes"]:
            problems.append("operands loaded without cp.async or TMA")
        narrow = sorted({s for s in ptx["cp_async_sizes"] if s < 16})
        if narrow:
            problems.append(f"cp.async narrower than 16 bytes ({narrow})")
        # Both operand tiles of every pipeline stage must go through cp.async (the pipeliner issues
        # stages - 1 copies before the loop and one in it); a tile read through registers instead
        # (an N-major weight: ld.global + a transpose) leaves the count short.
        copied = 16 * sum(1 for s in ptx["cp_async_sizes"] if s >= 16) * 32 * warps
        if not ptx["tma_loads"] and copied < job["staged_bytes"]:
            problems.append(f"cp.async stages {copied} B of the {job['staged_bytes']} B operand tiles")
        if ptx["byte_loads"]:
            problems.append(f"{ptx['byte_loads']} byte-wide global loads (operands read byte by byte)")
        if job["ctas"] and ctas < job["ctas"]:
            problems.append(f"{ctas} CTA(s) per SM fit, config claims {job['ctas']}")
    sass = " ".join(f"{k}={v}" for k, v in cub["sass"].items() if v)
    sizes = ptx["cp_async_sizes"]
    loads = (f"tma={ptx['tma_loads']}" if ptx["tma_loads"] else "") + (
        f" cp.async={len(sizes)}x{sorted(set(sizes))}B" if sizes else "")
    status = "ok" if not problems else "PROBLEM: " + "; ".join(problems)
    line = (f"sm_{arch} {job['name']:<15} {job['label']:<46} regs {cub['regs']:>3} "
            f"spill {cub['local'] + cub['stack']:>3} B smem {shared:>6} B ctas/SM {ctas}  {loads.strip()}  "
            f"[{sass}]  {secs:4.1f}s  {status}")
    return line, not problems


def control_jobs():
    """Variants the checks must reject, with the words their report must contain."""
    from lra_kernels.kernels.int8_gemm_persistent import _persistent

    yield tiled_job(64, 128, 128, 4, 4, "res", k_major=False), "cp.async stages"  # B through registers
    strided_q = tiled_job(64, 128, 128, 4, 4, "res")
    strided_q["ones"] = tuple(a for a in strided_q["ones"] if a != "stride_qk")  # q[:, ::2]: a gather
    strided_q["constexprs"]["K_MAJOR"] = False
    strided_q["label"] += " strided-q"
    yield strided_q, "byte-wide global loads"
    yield tiled_job(32, 64, 128, 4, 4, "qkv"), "no int8 wgmma"  # 32 rows: mma.sync, not a warpgroup
    yield tiled_job(128, 256, 128, 3, 8, "gelu"), "spills"  # the whole-tile epilogue of a large tile
    yield tiled_job(128, 128, 128, 3, 8, "res", ctas=2), "CTA(s) per SM fit"
    yield persistent_job(_persistent(128, 256, 128, 4, 8, 4, 1), "f32-quick_gelu-res"), "shared memory"


def self_test(arch: int, jobs: int) -> int:
    controls = list(control_jobs())
    ok = True
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(controls)))) as pool:
        results = pool.map(compile_one, [{**j, "arch": arch} for j, _ in controls])
        for (job, words), (line, good) in zip(controls, results):
            caught = not good and words in line
            ok &= caught
            print(("caught   " if caught else "MISSED   ") + line, flush=True)
    print(f"{len(controls)} known-bad variants, {'all flagged' if ok else 'SOME NOT FLAGGED'}")
    return 0 if ok else 1


def all_jobs(quick: bool, arch: int):
    jobs = [*other_jobs(quick), *gemm_jobs(quick)]
    return [{**j, "arch": arch} for j in jobs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one variant per kernel")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SM), help="compute capability (90 = H100/H200)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--self-test", action="store_true", help="compile known-bad variants; fail unless all are flagged")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args.arch, args.jobs)
    jobs = all_jobs(args.quick, args.arch)
    ok = True
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs)))) as pool:
        for line, good in pool.map(compile_one, jobs):
            print(line, flush=True)
            ok &= good
    print(f"{len(jobs)} variants compiled, {'all fine' if ok else 'PROBLEMS above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
