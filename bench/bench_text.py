"""ViT-B-32 text tower on CPU: ``encode_text`` of 1000 prompts (tokenized once), ours and open_clip in the same run.

    pytest bench/bench_text.py --benchmark-only

Providers: open_clip FP32 (eager), open_clip under bf16 autocast, ours (``QuantCLIP``, W8A8 per-token,
defaults: the CPU kernels, rows cut at their EOT token) and ours on the whole 77-token context (the
kernels alone, without the truncation). Random weights (no downloads here): the cosine is to FP32
open_clip with the same weights, not accuracy. Each provider's output is checked before it is timed.
After the last provider the ratios are printed.
"""

from __future__ import annotations

import gc

import pytest
import torch

from peers import platform_info

MODEL = "ViT-B-32"
N_PROMPTS = 1000
ROUNDS = 2
COSINE_FLOOR = 0.99  # only catches a broken provider
PROVIDERS = ("open_clip_fp32", "open_clip_bf16_autocast", "lra_int8", "lra_int8_full_context")
RESULTS: dict[str, dict] = {}

WORDS = ("dog cat bird car truck ship airplane horse frog deer apple tree house river mountain chair table lamp phone "
         "book goldfish tench hammerhead ostrich kite bald eagle vulture newt axolotl bullfrog loggerhead leatherback "
         "mud turtle terrapin banded gecko iguana chameleon whiptail lizard agama frilled lizard alligator lizard "
         "gila monster green lizard African chameleon Komodo dragon African crocodile American alligator triceratops "
         "thunder snake ringneck snake hognose snake").split()
TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
             "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
             "graffiti of a {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
             "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
             "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
             "a close-up photo of a {} sitting on a wooden table next to a window in the morning light.")


@pytest.fixture(scope="module")
def setup():
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(MODEL, pretrained=None).eval()
    texts = [t.format(w) for w in WORDS for t in TEMPLATES][:N_PROMPTS]
    assert len(texts) == N_PROMPTS, len(texts)
    tokens = open_clip.get_tokenizer(MODEL)(texts)
    with torch.inference_mode():
        reference = clip.encode_text(tokens).float()
    return clip, tokens, reference


def _provider(name, clip):
    if name == "open_clip_fp32":
        return torch.inference_mode()(lambda t: clip.encode_text(t).float())
    if name == "open_clip_bf16_autocast":
        def fn(t):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return clip.encode_text(t).float()
        return fn
    from lra_kernels import QuantCLIP

    q = QuantCLIP.from_open_clip(clip, tokenizer_name=MODEL)
    q.text.truncate_to_eot = name == "lra_int8"
    fn = q.encode_text
    fn.info = {"backend": q.visual.resolved_backend, "act_dtype": str(q.text_act_dtype).replace("torch.", ""),
               "act_quant": q.quant_config.act_quant, "truncate_to_eot": q.text.truncate_to_eot,
               "chunk_tokens": q.text.chunk_tokens}
    return fn


@pytest.mark.parametrize("name", PROVIDERS)
def test_encode_text_1000_prompts(benchmark, name, setup, quiet_gate, capsys):
    clip, tokens, reference = setup
    fn = _provider(name, clip)
    cos = torch.nn.functional.cosine_similarity(fn(tokens[:64]), reference[:64]).mean().item()  # also warms up
    assert cos > COSINE_FLOOR, f"{name}: cosine {cos:.4f} to FP32 open_clip; not timing a broken provider"
    benchmark.group = f"{MODEL} encode_text, CPU, {N_PROMPTS} prompts"
    out = benchmark.pedantic(fn, args=(tokens,), rounds=ROUNDS, iterations=1, warmup_rounds=0,
                             setup=quiet_gate.setup, teardown=quiet_gate.teardown)
    stats = benchmark.stats.stats if benchmark.stats else None
    info = {
        "prompts_per_s": N_PROMPTS / stats.min if stats else None,
        "seconds_best": stats.min if stats else None,
        "cosine_fp32": torch.nn.functional.cosine_similarity(out, reference).mean().item() if out is not None
        else cos,
        "mean_tokens_per_prompt": float((tokens.argmax(-1) + 1).float().mean()),
        "other_load_max": max(quiet_gate.loads, default=None),
        **getattr(fn, "info", {}),
        **platform_info(),
    }
    benchmark.extra_info.update(info)
    RESULTS[name] = info
    del fn
    gc.collect()
    if name == PROVIDERS[-1]:
        with capsys.disabled():
            print("\n" + "\n".join(summary()))


def summary() -> list[str]:
    """The table of ``RESULTS``: prompts/s, against FP32 open_clip and against ours, cosine, others' CPU share."""
    base = RESULTS.get("open_clip_fp32", {}).get("prompts_per_s")
    ours = RESULTS.get("lra_int8", {}).get("prompts_per_s")
    lines = [f"{MODEL} encode_text, {N_PROMPTS} prompts, CPU ({platform_info()['cpu']}, "
             f"{torch.get_num_threads()} threads), random weights",
             f"{'provider':<26} {'prompts/s':>10} {'x fp32':>7} {'ours/peer':>9} {'cos fp32':>9} {'others':>6}"]
    for name in PROVIDERS:
        r = RESULTS.get(name)
        if not r or r["prompts_per_s"] is None:
            continue
        pps = r["prompts_per_s"]
        load = r.get("other_load_max")
        lines.append(f"{name:<26} {pps:10.1f} {pps / base if base else float('nan'):7.2f} "
                     f"{ours / pps if ours else float('nan'):9.2f} {r['cosine_fp32']:9.5f} "
                     f"{'-' if load is None else format(load, '.0%'):>6}")
    return lines
