"""``lra_ee.label_transfer``: policies calibrated on one label set, measured on others (small tower, synthetic task)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tower
from lra_ee import label_transfer
from lra_ee.synthetic import builtin_task


@pytest.fixture(scope="module")
def result():
    visual = make_tower(layers=4, seed=5)
    return visual, label_transfer.measure_label_transfer(visual, n_images=96, n_classes=5, other_classes=(5, 9),
                                                         exit_layers=(1, 2, 3), batch_size=32)


def test_label_free_gate_is_marked_and_reported(result):
    _, res = result
    gates = res["gates"]
    assert gates["label_free"]["label_agnostic"] is True and gates["label_free"]["features"] == ["spatial_variance"]
    assert gates["all_features"]["label_agnostic"] is False
    for g in gates.values():
        assert list(g["sets"]) == ["A (calibrated)", "B5 (unseen)", "B9 (unseen)"]
        for o in g["sets"].values():
            assert sum(o["exit_histogram"].values()) == pytest.approx(1.0)
            assert o["exited_early"] == pytest.approx(1.0 - o["exit_histogram"][4])
            if o["exited_early"] == 0:
                assert o["agreement_with_full"] == 1.0 and o["acc_ee"] == o["acc_full"]
            assert -0.5 < o["flops_saving"] < 1.0
    table = label_transfer.markdown_table(res)
    assert table.count("\n") == 2 + 2 * 3 - 1 and "label-agnostic" in table


def test_label_free_exits_do_not_depend_on_the_labels(result):
    """The label-free policy's exit layers on one set of images are the same under any classifier."""
    from lra_ee.api import calibrate
    from lra_ee.data import TensorSource

    visual, _ = result
    task = builtin_task(visual, n_classes=5, n_images=96, seed=0)
    qvit, _ = calibrate(visual, TensorSource(task.images, task.labels, task.class_names), task.text_features,
                        exit_layers=(1, 2, 3), gate_features=("spatial_variance",), tau0=0.5)
    other = builtin_task(visual, n_classes=9, n_images=8, seed=7)
    layers = []
    for text in (task.text_features, other.text_features):
        qvit.set_classifier(text)
        layers.append(qvit.classify(other.images).exit_layer)
    torch.testing.assert_close(layers[0], layers[1], atol=0, rtol=0)
    assert (layers[0] < 4).any(), "tau0=0.5 on a fitted gate should let some images exit"


def test_calibrate_rejects_unknown_gate_features(result):
    from lra_ee.api import calibrate
    from lra_ee.data import TensorSource

    visual, _ = result
    task = builtin_task(visual, n_classes=3, n_images=16, seed=0)
    with pytest.raises(ValueError, match="gate_features must be a non-empty subset"):
        calibrate(visual, TensorSource(task.images, task.labels), task.text_features, gate_features=("nope",))
