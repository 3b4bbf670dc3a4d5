"""What a calibrated model records about its making, and the checks that use it."""

import shutil

import pytest
import torch

from conftest import make_tower
from lra_ee.data import TensorSource, load_image_folder
from lra_ee.provenance import (
    CALIBRATION_KEY,
    MODEL_KEY,
    calibration_record,
    check_reference_tower,
    exclude_calibration_images,
    exclude_images,
    fingerprints,
    source_model_record,
    with_meta,
)
from lra_ee.schemes import quantize
from lra_ee.synthetic import policy_with_exit_fractions
from test_data import write_image_folder


def _transform():
    import torchvision.transforms as T

    return T.Compose([T.Resize((32, 32)), T.ToTensor()])


def test_folder_fingerprints_follow_content_not_names(tmp_path):
    root = write_image_folder(tmp_path / "a", per_class=3, corrupt=False)
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    (copy / "cat" / "0.png").rename(copy / "cat" / "renamed.png")
    a, b = load_image_folder(root, _transform()), load_image_folder(copy, _transform())
    assert len(set(fingerprints(a))) == 6 and set(fingerprints(a)) == set(fingerprints(b))
    rec = calibration_record(a, [0, 4], {"seed": 1})
    assert rec["n_images"] == 2 and rec["files"] == ["cat/0.png", "dog_house/1.png"] and rec["split"] == {"seed": 1}
    kept, check, keep = exclude_images(b, set(rec["sha256_16"]))
    assert check["n_excluded"] == 2 and len(kept) == 4 and len(keep) == 4
    assert not {p for p, _ in kept.samples} & {str(copy / "cat" / "renamed.png"), str(copy / "dog_house" / "1.png")}


def test_tensor_fingerprints_and_exclusion():
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    src = TensorSource(images, torch.arange(6))
    fp = fingerprints(src)
    assert len(set(fp)) == 6 and fingerprints(TensorSource(images.clone())) == fp
    same, check, keep = exclude_images(src, set())
    assert same is src and check["n_excluded"] == 0 and keep is None
    with pytest.raises(ValueError, match="all 6 evaluation images were used to calibrate"):
        exclude_images(src, set(fp))


def test_exclusion_needs_a_record_to_claim_anything():
    v = make_tower()
    q = quantize(v, "per_token", None)
    q.set_classifier(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1))
    images = torch.randn(12, 3, 32, 32)
    q.exit_policy = policy_with_exit_fractions(q, images, (1, 2), (0.3, 0.3))
    src = TensorSource(images, torch.zeros(12, dtype=torch.long))
    same, check, _ = exclude_calibration_images(q, src)
    assert same is src and not check["checked"]
    q.exit_policy = with_meta(q.exit_policy, **{CALIBRATION_KEY: calibration_record(src, [1, 2, 3])})
    kept, check, keep = exclude_calibration_images(q, src)
    assert check["checked"] and check["n_excluded"] == 3 and keep.tolist() == [0, 4, 5, 6, 7, 8, 9, 10, 11]


def test_reference_tower_checks():
    v = make_tower(layers=3)
    q = quantize(v, "per_token", None)
    q.set_classifier(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1))
    q.exit_policy = policy_with_exit_fractions(q, torch.randn(8, 3, 32, 32), (1,), (0.5,))
    check_reference_tower(q, v, None, None)  # nothing recorded: architecture and weights still checked
    with pytest.raises(ValueError, match="architecture"):
        check_reference_tower(q, make_tower(layers=4), None, None)
    with pytest.raises(ValueError, match="weights differ"):
        check_reference_tower(q, make_tower(layers=3, seed=1), None, None)
    q.exit_policy = with_meta(q.exit_policy, **{MODEL_KEY: source_model_record("ViT-S-32", "random", 0)})
    check_reference_tower(q, v, "ViT-S-32", "random", 0)
    with pytest.raises(ValueError, match="quantized from ViT-S-32, not ViT-B-32"):
        check_reference_tower(q, v, "ViT-B-32", "random", 0)
    with pytest.raises(ValueError, match="weights 'random', not 'openai'"):
        check_reference_tower(q, v, "ViT-S-32", "openai")
    with pytest.raises(ValueError, match="seed 0, not 2"):
        check_reference_tower(q, v, "ViT-S-32", "random", 2)
