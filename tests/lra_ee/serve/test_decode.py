"""``lra_ee.serve.decode``: request bodies through open_clip's preprocessing, and the bodies it refuses."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from lra_ee.serve import decode
from serve_support import PREPROCESS, _encode, as_tensor, build_qvit, corrupt_bodies, valid_images


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def qvit(corpus):
    return build_qvit(corpus)


def test_preprocess_matches_open_clip_for_every_mode(corpus, qvit):
    transform = decode.build_transform(qvit.preprocess_cfg, qvit.image_size)
    modes = set()
    for name, body in corpus:
        modes.add(Image.open(io.BytesIO(body)).mode)
        x = decode.preprocess_body(body, transform)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32, name
        torch.testing.assert_close(x, as_tensor(body), atol=0, rtol=0, msg=name)
    assert {"RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"} <= modes


def test_transform_defaults_follow_open_clip():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    t = decode.build_transform({}, (48, 48))
    body = valid_images()[0][1]
    ref = image_transform_v2(PreprocessCfg(size=(48, 48)), is_train=False)(Image.open(io.BytesIO(body)))
    torch.testing.assert_close(t(Image.open(io.BytesIO(body))), ref, atol=0, rtol=0)


@pytest.mark.parametrize("name,body,message", corrupt_bodies(), ids=[c[0] for c in corrupt_bodies()])
def test_corrupt_bodies_are_rejected_with_a_message(name, body, message):
    transform = decode.build_transform(PREPROCESS)
    with pytest.raises(decode.BadImage, match=message):
        decode.preprocess_body(body, transform)


def test_oversized_image_is_rejected(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PIXELS", 1000)
    with pytest.raises(decode.BadImage, match="outside"):
        decode.decode_image(_encode(Image.new("RGB", (40, 40)), "PNG"))
