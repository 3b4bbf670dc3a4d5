"""``lra_kernels.heads``: the model's own head, written once, for the INT8 model and for open_clip's tower."""

import pytest
import torch

from conftest import images_for, make_tower
from lra_kernels import QuantEarlyExitViT
from lra_kernels.heads import check_text_features, normalise, own_head


@pytest.mark.parametrize("kwargs", [{}, {"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True},
                                    {"output_tokens": True}])
def test_own_head_is_open_clips_head(kwargs):
    """On the FP32 tower's last tokens the own head gives what ``visual(images)`` gives."""
    v = make_tower(**kwargs)
    images = images_for(v, 3)
    tokens = []
    hook = v.transformer.resblocks[-1].register_forward_hook(lambda _m, _i, out: tokens.append(out))
    with torch.no_grad():
        ref = v(images)
    hook.remove()
    pooled, patch = own_head(v, tokens[0], matmul=torch.matmul)
    if kwargs.get("output_tokens"):
        ref, ref_tokens = ref
        torch.testing.assert_close(patch, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)


def test_the_model_pool_is_the_own_head():
    v = make_tower()
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)
    x = q.forward_tokens(images_for(v, 4))
    torch.testing.assert_close(q.pool(x)[0], own_head(q, x, q.ops().matmul_rows)[0], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="no classifier set"):
        q.final_head(x)
    text = normalise(torch.randn(5, q.output_dim))
    q.set_classifier(text)
    logits, z = q.final_head(x)
    torch.testing.assert_close(z, normalise(q.pool(x)[0]), atol=0, rtol=0)
    assert logits.shape == (4, 5)


def test_text_features_are_checked():
    good = normalise(torch.randn(3, 8))
    assert check_text_features(good, 8).dtype == torch.float32
    with pytest.raises(ValueError, match="L2-normalised"):
        check_text_features(2 * good, 8)
    with pytest.raises(ValueError, match=r"\[C, 8\]"):
        check_text_features(good[:, :4], 8)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        check_text_features(good, 8, ["a", "b"])
    with pytest.raises(ValueError, match="logit_scale"):
        check_text_features(good, 8, logit_scale=0.0)
