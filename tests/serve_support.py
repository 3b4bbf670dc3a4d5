"""What the serving tests share: request bodies of every kind, the served model, the expected answers.

The fixtures of each test module are built from these (``corpus = fixture(valid_images)``...).
"""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_tower
from lra_kernels import ExitPolicy, QuantEarlyExitViT

DEPTH = 4
EXITS = (1, 2, 3)
CLASS_NAMES = ["cat", "dog", "car", "tree", "boat", "lamp", "cup"]
# Not open_clip's defaults, so a server that ignored the saved config would answer differently.
PREPROCESS = {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear",
              "resize_mode": "shortest"}
HTTP_TIMEOUT = 30.0


# ---------------------------------------------------------------------- images
def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(rng, h, w, channels=3) -> np.ndarray:
    """Smooth colour gradients plus noise: images that differ in structure, not only in noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = rng.uniform(-3, 3, size=(channels, 3))
    base = np.stack([np.sin(a[c, 0] * xx * 6 + a[c, 1] * yy * 6 + a[c, 2]) for c in range(channels)], -1)
    pic = 127.5 + 100 * base + rng.normal(0, 25, size=(h, w, channels))
    return pic.clip(0, 255).astype(np.uint8)


def valid_images() -> list[tuple[str, bytes]]:
    """JPEG/PNG/WebP files of awkward sizes and every PIL mode open_clip's transform converts."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(_picture(rng, h, w))  # noqa: E731
    i16 = (_picture(rng, 37, 45, 1)[..., 0].astype(np.uint16) * 257 + rng.integers(0, 257, (37, 45))).astype(np.uint16)
    return [
        ("rgb.jpg", _encode(rgb(48, 64), "JPEG", quality=90)),
        ("rgb_tiny.png", _encode(rgb(7, 5), "PNG")),
        ("rgb_wide.jpg", _encode(rgb(20, 200), "JPEG")),
        ("rgb_tall.png", _encode(rgb(150, 21), "PNG")),
        ("rgb_large.jpg", _encode(rgb(480, 640), "JPEG")),
        ("rgba.png", _encode(Image.fromarray(_picture(rng, 40, 33, 4), "RGBA"), "PNG")),
        ("l.png", _encode(Image.fromarray(_picture(rng, 31, 31, 1)[..., 0], "L"), "PNG")),
        ("la.png", _encode(Image.fromarray(_picture(rng, 30, 44, 2), "LA"), "PNG")),
        ("p.png", _encode(rgb(50, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")),
        ("one_bit.png", _encode(rgb(33, 35).convert("1"), "PNG")),
        ("cmyk.jpg", _encode(rgb(36, 52).convert("CMYK"), "JPEG")),
        ("i16.png", _encode(Image.fromarray(i16), "PNG")),
        ("rgb.webp", _encode(rgb(60, 45), "WEBP", lossless=True)),
        ("rgba.webp", _encode(Image.fromarray(_picture(rng, 29, 38, 4), "RGBA"), "WEBP", quality=80)),
    ]


def corrupt_bodies() -> list[tuple[str, bytes, str]]:
    """(name, body, part of the expected error message)."""
    rng = np.random.default_rng(1)
    jpeg = _encode(Image.fromarray(_picture(rng, 64, 64)), "JPEG")
    png = _encode(Image.fromarray(_picture(rng, 64, 64)), "PNG")
    return [
        ("empty", b"", "empty"),
        ("text", b"this is not an image", "not a JPEG, PNG or WebP"),
        ("gif", _encode(Image.fromarray(_picture(rng, 16, 16)), "GIF"), "not a JPEG, PNG or WebP"),
        ("truncated.jpg", jpeg[: len(jpeg) // 3], "JPEG"),
        ("truncated.png", png[: len(png) // 2], "PNG"),
        ("png_header_only", png[:40], "corrupt or truncated PNG"),
    ]


def reference_transform():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**PREPROCESS), is_train=False)


def as_tensor(body: bytes) -> torch.Tensor:
    return reference_transform()(Image.open(io.BytesIO(body)))


# ---------------------------------------------------------------------- models
def tower():
    v = make_tower(layers=DEPTH, seed=3)
    v.preprocess_cfg = dict(PREPROCESS)
    return v


def spread_policy(qvit, images, fractions=(0.25, 0.3, 0.4)) -> ExitPolicy:
    """Thresholds between two neighbouring gate scores, so that about ``fractions[j]`` of the rows
    still running leave at exit j and no score sits on a threshold (tiny float differences between
    machines or thread counts cannot move a sample to another exit)."""
    res = qvit.all_exits(images, EXITS)
    mean, std = res.features.mean(1), res.features.std(1).clamp_min(1e-6)
    L = len(EXITS)
    p = ExitPolicy(EXITS, torch.tensor([[4.0, 1.0, 0.0]] * L), torch.zeros(L), mean, std, torch.ones(L))
    return spread_thresholds(p, qvit, images, fractions)


def build_qvit(corpus):
    """The served model: a tiny tower, a classifier, a policy that spreads the corpus over every exit."""
    torch.manual_seed(0)
    q = QuantEarlyExitViT.from_open_clip(tower(), compile_blocks=False)
    q.set_classifier(F.normalize(torch.randn(len(CLASS_NAMES), 32), dim=-1), class_names=CLASS_NAMES)
    q.exit_policy = spread_policy(q, torch.stack([as_tensor(b) for _, b in corpus]))
    return q


def saved(qvit, tmp_path_factory):
    return qvit.save(tmp_path_factory.mktemp("served") / "model")


def _single(fn, x: torch.Tensor):
    """The model's answer for one image alone, with one torch thread (as the test replicas run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(x.unsqueeze(0))
    finally:
        torch.set_num_threads(threads)


def expected_answers(model, corpus) -> list[dict]:
    """Per image: what /embed and /classify must answer (model: a QuantEarlyExitViT)."""
    out = []
    for _, body in corpus:
        x = as_tensor(body)
        emb = _single(model, x)[0]
        res = _single(model.classify, x)
        probs = torch.softmax(res.logits[0], -1)
        out.append({"embedding": emb, "exit_layer": int(res.exit_layer[0]), "probs": probs})
    return out


def check_embed(answer: dict, expected: dict) -> None:
    assert set(answer) == {"embedding", "exit_layer"}
    assert answer["exit_layer"] == expected["exit_layer"]
    got = torch.tensor(answer["embedding"], dtype=torch.float32)
    torch.testing.assert_close(got, expected["embedding"], atol=1e-6, rtol=0)


def check_classify(answer: dict, expected: dict, names=CLASS_NAMES, prob_atol: float = 1e-6) -> None:
    assert set(answer) == {"label", "name", "score", "top5", "exit_layer"}
    probs = expected["probs"]
    label = int(probs.argmax())
    assert answer["label"] == label
    assert answer["name"] == (names[label] if names else None)
    assert answer["score"] == pytest.approx(float(probs[label]), abs=prob_atol)
    top = probs.topk(min(5, probs.numel()))
    assert [c for c, _ in answer["top5"]] == top.indices.tolist()
    assert [p for _, p in answer["top5"]] == pytest.approx(top.values.tolist(), abs=prob_atol)
    assert answer["exit_layer"] == expected["exit_layer"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---------------------------------------------------------------------- whole CLIP models (text tower)
TEXT_LAYERS = 2


def tiny_clip(seed: int = 3):
    """A small open_clip ``CLIP`` (the served tower's architecture, a 2-block text tower, open_clip's
    tokenizer) with seeded random weights, biases and LayerNorms randomised as ``make_tower`` does."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=DEPTH, width=64, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, width=64, heads=4, layers=TEXT_LAYERS),
    )
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith(("ln_", "visual.ln_")):
                p.add_(0.1 * torch.randn_like(p))
    clip.visual.preprocess_cfg = dict(PREPROCESS)
    return clip.eval().requires_grad_(False)


def reference_text_features(clip, names, templates=("{}",)) -> torch.Tensor:
    """Zero-shot rows written out from open_clip's own calls (the oracle for the served label sets)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=77)
    rows = []
    with torch.no_grad():
        for name in names:
            e = F.normalize(clip.encode_text(tok([t.format(name) for t in templates])).float(), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def early_exit_clip(corpus, label_agnostic: bool = False):
    """A ``QuantCLIP`` of ``tiny_clip`` (both towers INT8) with the classifier of ``CLASS_NAMES`` on its visual
    and a policy that spreads the corpus over every exit. ``label_agnostic``: the gate reads the spatial
    variance only (zero weight on confidence and margin) and says so."""
    from lra_kernels import QuantCLIP

    clip = QuantCLIP.from_open_clip(tiny_clip(), tokenizer_name="ViT-B-32")
    q = clip.visual
    q.compile_blocks = False
    q.set_classifier(reference_text_features(clip, CLASS_NAMES), float(clip.logit_scale.exp()), CLASS_NAMES)
    images = torch.stack([as_tensor(b) for _, b in corpus])
    q.exit_policy = label_free_policy(q, images) if label_agnostic else spread_policy(q, images)
    return clip


def label_free_policy(qvit, images, fractions=(0.25, 0.3, 0.4)) -> ExitPolicy:
    """As ``spread_policy``, with a gate over the spatial variance alone, marked ``label_agnostic``."""
    import dataclasses

    p = spread_policy(qvit, images, fractions)
    w = torch.zeros_like(p.weight)
    w[:, 2] = 1.0
    p = dataclasses.replace(p, weight=w, meta={"label_agnostic": True})
    return spread_thresholds(p, qvit, images, fractions)


def spread_thresholds(policy: ExitPolicy, qvit, images, fractions) -> ExitPolicy:
    """``policy`` with thresholds between two neighbouring gate scores, so that about ``fractions[j]`` of the
    rows still running leave at exit j and no score sits on a threshold."""
    res = qvit.all_exits(images, policy.exit_layers)
    remaining = torch.ones(images.shape[0], dtype=torch.bool)
    taus = []
    for j, frac in enumerate(fractions):
        scores = policy.gate_scores(j, res.features[j])
        cand = scores[remaining].sort(descending=True).values
        k = max(1, round(frac * len(cand)))
        while k < len(cand) and cand[k - 1] - cand[k] < 1e-4:
            k += 1
        tau = float(cand[k - 1] + cand[k]) / 2 if k < len(cand) else float(cand[-1]) - 1e-3
        taus.append(tau)
        remaining &= scores < tau
    return policy.with_thresholds(taus)


def b64(body: bytes) -> str:
    import base64

    return base64.b64encode(body).decode("ascii")


def http_json(method: str, url: str, payload) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
