"""``lra_kernels.tower``: the parts a model is built from, checked against the architecture."""

import pytest
import torch

from conftest import images_for, make_tower
from lra_kernels import QuantConfig, QuantEarlyExitViT
from lra_kernels.convert import arch_from_visual, convert_open_clip
from lra_kernels.tower import PatchEmbed, TowerParts, check_images, empty_parts


def test_converter_builds_every_part_whole():
    v = make_tower()
    arch, parts = convert_open_clip(v, QuantConfig())
    assert isinstance(parts, TowerParts) and len(parts.blocks) == arch.layers
    torch.testing.assert_close(parts.positional_embedding, v.positional_embedding.detach())
    for i, b in enumerate(parts.blocks):
        assert b.attn.in_proj.qweight.abs().sum() > 0, f"block {i} is a placeholder"
    q = QuantEarlyExitViT(arch, QuantConfig(), parts=parts, compile_blocks=False)
    assert q.transformer.resblocks[0] is parts.blocks[0]


def test_empty_parts_have_the_shapes_of_the_saved_state():
    v = make_tower()
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)
    empty = QuantEarlyExitViT(q.arch, q.quant_config, parts=empty_parts(q.arch, q.quant_config))
    assert {k: t.shape for k, t in empty.state_dict().items()} == {k: t.shape for k, t in q.state_dict().items()}


def test_parts_that_do_not_fit_the_architecture_are_refused():
    arch = arch_from_visual(make_tower())
    parts = empty_parts(arch, QuantConfig())
    parts.positional_embedding = torch.zeros(3, arch.width)
    with pytest.raises(ValueError, match="positional_embedding must have shape"):
        parts.check(arch)
    parts = empty_parts(arch, QuantConfig())
    parts.blocks = parts.blocks[:-1]
    with pytest.raises(ValueError, match="blocks for a tower of"):
        QuantEarlyExitViT(arch, parts=parts)
    with pytest.raises(ValueError, match="not both or neither"):
        PatchEmbed((8, 8))


def test_image_checks_say_what_was_expected():
    v = make_tower()
    good = images_for(v, 2)
    assert check_images(good, (32, 32), torch.device("cpu")) is good
    with pytest.raises(ValueError, match="height x width 32 x 32"):
        check_images(good[:, :, :16], (32, 32), torch.device("cpu"))
    with pytest.raises(TypeError, match="float images"):
        check_images(good.to(torch.int32), (32, 32), torch.device("cpu"))
