"""Measurements through the executor on recorded batches; alignment when images are unreadable."""

import numpy as np
import pytest
import torch

from conftest import make_tower
from lra_ee.data import load_image_folder
from lra_ee.experiment import ExperimentConfig, run_experiment
from lra_ee.measure import ExecutorRun, batch_plan, batch_sensitivity, run_executor, simulation_agreement
from lra_ee.schemes import quantize
from lra_ee.synthetic import policy_with_exit_fractions
from lra_kernels import ExitPolicy
from lra_kernels.flops import flops_model
from test_data import write_image_folder


def _transform():
    import torchvision.transforms as T

    return T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure") / "data"
    return write_image_folder(root, classes=("a", "b", "c", "d"), per_class=30, size=(36, 36), corrupt=True)


@pytest.fixture(scope="module")
def tower():
    return make_tower(layers=4, width=64)


def _text(seed=0, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(c, 32, generator=g), dim=-1)


def test_batch_plan():
    pos = np.arange(10, 30)
    shuffled = batch_plan(pos, 4, "shuffled", seed=1)
    assert sorted(shuffled.tolist()) == pos.tolist() and shuffled.tolist() != pos.tolist()
    assert batch_plan(pos, 4, "shuffled", seed=1).tolist() == shuffled.tolist()
    keys = pos % 3
    srt = batch_plan(pos, 4, "sorted", keys=keys)
    assert (np.diff(srt % 3) >= 0).all() and batch_plan(pos, 4, "index").tolist() == pos.tolist()
    with pytest.raises(ValueError, match="keys"):
        batch_plan(pos, 4, "sorted")
    with pytest.raises(ValueError, match="order"):
        batch_plan(pos, 4, "random")


def test_run_executor_rows_stay_aligned_past_unreadable_images(folder, tower):
    src = load_image_folder(folder, _transform(), num_workers=0)
    qvit = quantize(tower, "per_token", None)
    qvit.set_classifier(_text())
    images = {}
    for i, (path, _) in enumerate(src.samples):
        if not path.endswith("broken.jpg"):
            images[i] = next(src.subset([i]).batches(1))[0]
    policy = policy_with_exit_fractions(qvit, torch.cat(list(images.values()))[:64], (1, 2), (0.3, 0.3))
    plan = batch_plan(np.arange(len(src)), 8, "shuffled", seed=2)
    with pytest.warns(UserWarning, match="broken.jpg"):
        run = run_executor(qvit, src, plan, 8, {"ee": policy, "full": ExitPolicy.disabled()})
    assert run.n == len(src) - 1 and src.n_skipped == 1
    assert [p for b in run.batches for p in b] == run.index.tolist()
    qvit.exit_policy = policy
    for r in (0, 7, 40, run.n - 1):  # each row is the image at its recorded position
        res = qvit.classify(images[int(run.index[r])])
        assert int(res.logits.argmax()) == run.top5["ee"][r, 0] and int(res.exit_layer) == run.exit_layer["ee"][r]


def test_simulation_agreement_counts_disagreements():
    run = ExecutorRun(np.array([5, 3, 9]), np.zeros(3, np.int64), {"ee": np.array([[1], [2], [3]]),
                                                                    "full": np.array([[1], [1], [1]])},
                      {"ee": np.array([2, 4, 4]), "full": np.array([4, 4, 4])})
    a = simulation_agreement([3, 9, 5], [4, 4, 2], [2, 0, 1], [1, 1, 1], run)
    assert a["exit_layer_agreement"] == 1.0 and a["prediction_agreement"] == pytest.approx(2 / 3) and not a["exact"]
    assert simulation_agreement([3, 9, 5], [4, 4, 2], [2, 3, 1], [1, 1, 1], run)["exact"]
    with pytest.raises(ValueError, match="did not run"):
        simulation_agreement([4], [4], [1], [1], run)


def test_experiment_on_an_image_folder_with_an_unreadable_file(folder, tower):
    """The simulation check lines up executor and tables by source position, and the skipped file is counted."""
    src = load_image_folder(folder, _transform(), num_workers=0)
    cfg = ExperimentConfig(scheme="per_token", seeds=(0,), n_quant_calib=8, n_qirc=8, n_boot=100, batch_size=16,
                           exit_layers=(1, 2, 3), ablate=False, random_gate_draws=50)
    with pytest.warns(UserWarning, match="broken.jpg"):
        r = run_experiment(tower, src, _text(), cfg, ["a", "b", "c", "d"], progress=False).report.to_dict()
    assert r["n_skipped"] == 1
    assert r["n_quant_calibration"] + r["n_qirc"] + r["n_calibration"] + r["n_eval"] == 120
    assert r["executor_check"]["exact"] and r["executor_check"]["n"] == r["n_eval"]
    assert r["simulated"]["acc_ee"] == r["acc_ee"]


def test_batch_sensitivity_of_the_paper_scheme(tower):
    g = torch.Generator().manual_seed(3)
    from lra_ee.data import TensorSource

    src = TensorSource(torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 4, (48,), generator=g))
    qvit = quantize(tower, "paper", None)
    qvit.set_classifier(_text())
    policy = policy_with_exit_fractions(qvit, src.images, (1, 2), (0.3, 0.3))
    fm = flops_model(qvit.arch, 4)
    plan = batch_plan(np.arange(48), 16, "shuffled", seed=0)
    cache = {}
    main = run_executor(qvit, src, plan, 16, {"ee": policy, "full": ExitPolicy.disabled()}, cache)
    targets = {i: int(src.labels[i]) for i in range(48)}
    out = batch_sensitivity(qvit, src, plan, targets, policy, fm, batch_sizes=(1, 16, 64), limit=32, n_boot=100,
                            cache=cache)
    assert set(out["runs"]) == {"b1", "b16_shuffled", "b16_sorted", "b64"} and out["n"] == 32
    qvit.exit_policy = policy
    for i in (0, 13, 31):  # batch 1: each image alone
        p = int(plan[i])
        res = qvit.classify(src.images[p : p + 1])
        assert out["runs"]["b1"]["exit_histogram"][int(res.exit_layer)] > 0
    # the shuffled batches of 16 are the evaluation run's first two: taken from the cache, identical
    b16 = out["runs"]["b16_shuffled"]
    rows = main.rows_of(plan[:32])
    y = src.labels[torch.from_numpy(plan[:32])].numpy()
    assert b16["acc_ee"] == pytest.approx(float((main.top5["ee"][rows, 0] == y).mean()))
    assert b16["n_batches"] == 2 and out["runs"]["b64"]["n_batches"] == 1
    for r in out["runs"].values():
        assert r["acc_ee"] - r["acc_full"] == pytest.approx(r["rescued"] - r["hurt"])
