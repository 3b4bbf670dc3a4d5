"""``clip.visual = qvit``: open_clip's own entry points keep working."""

import pytest
import torch

from conftest import cosine
from lra_kernels import QuantEarlyExitViT


@pytest.fixture(scope="module")
def clip_pair():
    import open_clip

    torch.manual_seed(0)
    cfg = dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
    )
    clip = open_clip.CLIP(**cfg).eval()
    clip.visual.preprocess_cfg = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    qvit = QuantEarlyExitViT.from_open_clip(clip.visual, compile_blocks=False)
    return clip, qvit


def test_encode_image_and_forward(clip_pair):
    import copy

    clip, qvit = clip_pair
    images = torch.randn(5, 3, 32, 32)
    text = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        ref_img = clip.encode_image(images, normalize=True)
        ref_out = clip(images, text)
    qclip = copy.deepcopy(clip)
    qclip.visual = qvit
    with torch.no_grad():
        img = qclip.encode_image(images, normalize=True)
        out = qclip(images, text)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    assert cosine(img, ref_img).min() > 0.99
    # CLIP.forward returns a dict or a tuple depending on output_dict; compare what it gave.
    ref_feats = ref_out["image_features"] if isinstance(ref_out, dict) else ref_out[0]
    feats = out["image_features"] if isinstance(out, dict) else out[0]
    assert feats.shape == ref_feats.shape and cosine(feats, ref_feats).min() > 0.99
    text_feats = out["text_features"] if isinstance(out, dict) else out[1]
    assert (feats @ text_feats.T).shape == (5, 4)


def test_preprocess_attributes_are_kept(clip_pair):
    clip, qvit = clip_pair
    assert qvit.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)
    assert qvit.image_mean == (0.5, 0.5, 0.5) and qvit.image_std == (0.25, 0.25, 0.25)


def test_parent_half_keeps_int8_tower_fp32(clip_pair):
    import copy

    clip, qvit = clip_pair
    qclip = copy.deepcopy(clip)
    qclip.visual = copy.deepcopy(qvit)
    qclip.half()
    assert qclip.visual.class_embedding.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(qclip.visual(x.half()).float(), qvit(x), atol=2e-2, rtol=2e-2)
