"""``lra_ee.serve.engines``: what a replica loads and serves."""

from __future__ import annotations

import json

import pytest
import torch

from lra_ee.serve import engines
from serve_support import CLASS_NAMES, build_qvit, saved, valid_images


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def qvit(corpus):
    return build_qvit(corpus)


@pytest.fixture(scope="module")
def model_dir(qvit, tmp_path_factory):
    return saved(qvit, tmp_path_factory)


def test_saved_config_carries_preprocess_cfg_and_classes(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["arch"]["preprocess_cfg"]["interpolation"] == "bilinear"
    assert cfg["extra"]["classifier"]["class_names"] == CLASS_NAMES



def test_engine_rejects_other_objects():
    with pytest.raises(TypeError, match="cannot serve"):
        engines.as_engine(torch.nn.Linear(2, 2))
