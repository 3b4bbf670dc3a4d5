"""Image sources, splits, templates and the cached zero-shot text classifier."""


import numpy as np
import pytest
import torch

from lra_ee.data import (
    DataError,
    TensorSource,
    load_classnames,
    load_image_folder,
    load_templates,
    split_indices,
    text_classifier,
)


def write_image_folder(root, classes=("cat", "dog_house"), per_class=3, size=(40, 30), corrupt=True):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        d = root / c
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.jpg").write_bytes(b"not an image at all")
    return root


def _transform():
    import torchvision.transforms as T

    return T.Compose([T.Resize((32, 32)), T.ToTensor()])


def test_image_folder_labels_names_and_unreadable_files(tmp_path):
    root = write_image_folder(tmp_path / "data")
    src = load_image_folder(root, _transform(), num_workers=0)
    assert src.class_names == ["cat", "dog house"] and len(src) == 7 and src.has_labels
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        batches = list(src.batches(4))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    index = torch.cat([b[2] for b in batches])
    assert images.shape == (6, 3, 32, 32) and src.n_skipped == 1
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(index.tolist()) == [i for i in range(7) if "broken" not in src.samples[i][0]]


def test_flat_folder_is_unlabelled_and_errors_are_clear(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(flat / f"{i}.jpg")
    src = load_image_folder(flat, _transform(), num_workers=0)
    assert not src.has_labels and len(src) == 3
    labels = torch.cat([b[1] for b in src.batches(2)])
    assert (labels == -1).all()
    with pytest.raises(DataError, match="no data directory"):
        load_image_folder(tmp_path / "missing", _transform())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(tmp_path / "empty", _transform())
    root = write_image_folder(tmp_path / "two", corrupt=False)
    with pytest.raises(DataError, match="3 class names for 2 class folders"):
        load_image_folder(root, _transform(), class_names=["a", "b", "c"])


def test_classnames_and_templates_files(tmp_path):
    (tmp_path / "names.txt").write_text("tabby cat\n\nred panda\n")
    assert load_classnames(tmp_path / "names.txt") == ["tabby cat", "red panda"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\nart of the {c}\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "art of the {}"]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(DataError, match="placeholder"):
        load_templates(str(tmp_path / "bad.txt"))
    assert len(load_templates("openai")) == 80 and len(load_templates("simple")) == 7


def test_splits_are_disjoint_deterministic_and_seeded():
    a, b = split_indices(100, 0.3, seed=0)
    assert len(a) == 30 and len(b) == 70 and not set(a) & set(b) and set(a) | set(b) == set(range(100))
    a2, _ = split_indices(100, 0.3, seed=0)
    a3, _ = split_indices(100, 0.3, seed=1)
    assert np.array_equal(a, a2) and not np.array_equal(a, a3)
    with pytest.raises(DataError):
        split_indices(3, 0.1, 0)


def test_tensor_source_checks():
    with pytest.raises(DataError, match=r"\[N, 3, H, W\]"):
        TensorSource(torch.zeros(2, 1, 4, 4))
    with pytest.raises(DataError, match="labels"):
        TensorSource(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))
    src = TensorSource(torch.randn(5, 3, 4, 4), torch.arange(5))
    sub = src.subset([4, 1])
    assert sub.labels.tolist() == [4, 1] and len(sub) == 2


def test_text_classifier_is_normalised_and_cached(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    names, templates = ["cat", "dog", "red panda"], ["a photo of a {}.", "a {}."]
    w = text_classifier(model, tok, names, templates, "tiny-random", cache_dir=tmp_path)
    assert w.shape == (3, 16)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3))
    assert len(list(tmp_path.glob("text-classifier-*.safetensors"))) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # a cache hit must not touch the model
    assert torch.equal(text_classifier(model, tok, names, templates, "tiny-random", cache_dir=tmp_path), w)
    other_model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1,
                                                               head_width=16),
                                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    other = text_classifier(other_model,
                            tok, names, ["{}"], "tiny-random", cache_dir=tmp_path)
    assert not torch.equal(other, w), "different templates must not hit the same cache entry"


def test_unreadable_images_are_counted_once_by_every_source_that_holds_them(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=4)
    src = load_image_folder(root, _transform(), num_workers=0)
    broken = [i for i, (p, _) in enumerate(src.samples) if p.endswith("broken.jpg")]
    half = src.subset([*broken, 0, 5], "half")
    other = src.subset([1, 2])
    with pytest.warns(UserWarning, match="broken.jpg"):
        list(half.batches(2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later passes neither warn again nor count twice
        for _ in range(2):
            list(half.batches(3))
            list(src.batches(4))
    assert half.n_skipped == 1 and src.n_skipped == 1 and other.n_skipped == 0
    assert src.skipped == [src.samples[broken[0]][0]]
