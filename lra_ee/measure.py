"""Measurements through the deployed executor (``QuantEarlyExitViT.classify``) on recorded batches.

Reported accuracy, quadrants, FLOPs and exit histograms come from here: each batch of the
evaluation split (a seeded shuffle cut into ``batch_size`` pieces, recorded in the report) runs
through ``classify`` under the calibrated policy and, for the full-depth baseline, under
``ExitPolicy.disabled()`` — the same batches, so a batch-dependent scheme (the paper's per-tensor
dynamic activation scales) is compared with itself. The exit-table simulation is then checked
against these results on the whole split (``simulation_agreement``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from lra_kernels import ExitPolicy

from . import stats


def batch_plan(positions, batch_size: int, order: str = "shuffled", seed: int = 0, keys=None) -> np.ndarray:
    """The order in which ``positions`` are fed, cut into consecutive batches of ``batch_size``.

    ``"shuffled"``: a seeded permutation; ``"sorted"``: by ``keys`` (e.g. the class, as an
    ImageNet folder is read), then position; ``"index"``: as given.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if order == "shuffled":
        return np.random.default_rng(seed).permutation(positions)
    if order == "sorted":
        if keys is None:
            raise ValueError("a sorted batch plan needs keys (one per position)")
        return positions[np.lexsort((positions, np.asarray(keys)))]
    if order == "index":
        return positions.copy()
    raise ValueError(f"order must be 'shuffled', 'sorted' or 'index', got {order!r}")


def batches_digest(batches: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(batches).encode()).hexdigest()[:16]


@dataclass
class ExecutorRun:
    """Per-sample results of ``classify``, rows in the order the batches ran.

    index[N]: positions in the source; labels[N]; top5[name][N, k] and exit_layer[name][N] per
    policy run; batches: the positions of each batch as it ran (unreadable images drop out).
    """

    index: np.ndarray
    labels: np.ndarray
    top5: dict[str, np.ndarray]
    exit_layer: dict[str, np.ndarray]
    batches: list[list[int]] = field(default_factory=list)
    batch_size: int = 0

    @property
    def n(self) -> int:
        return int(self.index.size)

    def rows_of(self, index) -> np.ndarray:
        pos = {int(i): r for r, i in enumerate(self.index)}
        missing = [int(i) for i in index if int(i) not in pos]
        if missing:
            raise ValueError(f"source positions {missing[:5]} did not run through the executor")
        return np.array([pos[int(i)] for i in index], dtype=np.int64)

    def record(self, order: str, seed: int | None, with_batches: bool = True) -> dict:
        rec = {"batch_size": self.batch_size, "order": order, "seed": seed, "n": self.n, "n_batches": len(self.batches),
               "digest": batches_digest(self.batches)}
        if with_batches:
            rec["batches"] = self.batches
        return rec


@torch.no_grad()
def run_executor(qvit, source, plan: np.ndarray, batch_size: int, policies: dict[str, ExitPolicy],
                 cache: dict | None = None, desc: str | None = None) -> ExecutorRun:
    """Run ``plan`` (positions of ``source``) through ``qvit.classify`` in batches of ``batch_size``,
    once per policy (``ExitPolicy.disabled()`` = the full-depth model). ``cache`` maps
    ``(policy name, batch positions)`` to results already measured on exactly that batch."""
    plan = np.asarray(plan, dtype=np.int64)
    k = min(5, qvit.require_classifier().shape[0])
    cache = {} if cache is None else cache
    index, labels, batches = [], [], []
    top5 = {name: [] for name in policies}
    exits = {name: [] for name in policies}
    sub = source.subset(plan)
    for images, lab, idx in tqdm(sub.batches(batch_size), total=-(-len(sub) // batch_size), desc=desc,
                                 disable=desc is None, leave=False):
        pos = plan[idx.numpy()]
        key = tuple(int(p) for p in pos)
        for name, policy in policies.items():
            if (name, key) not in cache:
                res = qvit.classify(images.to(qvit.device), policy=policy)
                cache[(name, key)] = (res.logits.topk(k, dim=-1).indices.cpu().numpy(),
                                      res.exit_layer.cpu().numpy().astype(np.int64))
            t5, el = cache[(name, key)]
            top5[name].append(t5)
            exits[name].append(el)
        index.append(pos)
        labels.append(lab.numpy())
        batches.append(list(key))
    if not index:
        raise ValueError("no readable image ran through the executor")
    return ExecutorRun(np.concatenate(index), np.concatenate(labels), {n: np.concatenate(v) for n, v in top5.items()},
                       {n: np.concatenate(v) for n, v in exits.items()}, batches, batch_size)


def simulation_agreement(sim_index, sim_exit_layer, sim_top1, sim_full_top1, run: ExecutorRun,
                         ee: str = "ee", full: str = "full") -> dict:
    """How often the exit-table simulation matches the executor, sample by sample (aligned by
    source position): exit layer and prediction under the policy, prediction at full depth."""
    rows = run.rows_of(sim_index)
    agree_layer = float((run.exit_layer[ee][rows] == np.asarray(sim_exit_layer)).mean())
    agree_pred = float((run.top5[ee][rows, 0] == np.asarray(sim_top1)).mean())
    agree_full = float((run.top5[full][rows, 0] == np.asarray(sim_full_top1)).mean())
    return {"n": int(rows.size), "exit_layer_agreement": agree_layer, "prediction_agreement": agree_pred,
            "full_depth_agreement": agree_full, "exact": agree_layer == agree_pred == agree_full == 1.0}


def _summary(run: ExecutorRun, y: np.ndarray, fm, exit_layers, ref: ExecutorRun | None, n_boot: int, seed: int) -> dict:
    ee_right, full_right = run.top5["ee"][:, 0] == y, run.top5["full"][:, 0] == y
    q = stats.quadrants(ee_right, full_right)
    boot = stats.paired_bootstrap(ee_right, full_right, n_boot=n_boot, seed=seed)
    per = fm.per_sample(torch.from_numpy(run.exit_layer["ee"]), tuple(exit_layers)).double()
    out = {"acc_ee": float(ee_right.mean()), "acc_full": float(full_right.mean()), "delta": q.rescued - q.hurt,
           "delta_ci95": boot["delta_ci"], "rescued": q.rescued, "hurt": q.hurt,
           "flops_saving": 1.0 - float(per.mean()) / fm.full(),
           "exit_histogram": {int(v): float((run.exit_layer["ee"] == v).mean()) for v in (*exit_layers, fm.depth)},
           "n": run.n, "n_batches": len(run.batches)}
    if ref is not None:
        rows = ref.rows_of(run.index)
        out["agreement_with_batch_1"] = {
            "ee_prediction": float((ref.top5["ee"][rows, 0] == run.top5["ee"][:, 0]).mean()),
            "ee_exit_layer": float((ref.exit_layer["ee"][rows] == run.exit_layer["ee"]).mean()),
            "full_prediction": float((ref.top5["full"][rows, 0] == run.top5["full"][:, 0]).mean())}
    return out


def batch_sensitivity(qvit, source, plan: np.ndarray, targets: dict[int, int], policy: ExitPolicy, fm,
                      batch_sizes=(1, 32, 256), limit: int = 1024, n_boot: int = 1000, seed: int = 0,
                      cache: dict | None = None, desc: str | None = None) -> dict:
    """The same images through the executor in batches of each size, shuffled and class-sorted.

    ``plan``: the evaluation run's shuffled order (its first ``limit`` positions are used, so the
    shuffled runs at that run's batch size reuse its results through ``cache``); ``targets``:
    position -> target class (the sort key). Batch 1 is order-free by construction and runs once, as
    does a batch size that holds all the images in one batch.
    Agreement with batch 1 says how much of each result the company of other images decided.
    """
    shuffled = np.asarray(plan, dtype=np.int64)[:limit]
    keys = np.array([targets[int(p)] for p in shuffled])
    orders = {"shuffled": shuffled, "sorted": batch_plan(shuffled, 1, "sorted", keys=keys)}
    policies = {"ee": policy, "full": ExitPolicy.disabled()}
    cache = {} if cache is None else cache
    say = (lambda what: None) if desc is None else (lambda what: f"{desc}: {what}")
    ref = run_executor(qvit, source, shuffled, 1, policies, cache, say("batch 1"))
    out = {"n": ref.n, "exit_layers": list(policy.exit_layers), "runs": {}}
    for b in batch_sizes:
        if b == 1:
            runs = {"b1": (ref, "any (one image per batch)")}
        elif b >= len(shuffled):  # one batch holds every image: sorting does not change its composition
            runs = {f"b{b}": (run_executor(qvit, source, shuffled, b, policies, cache, say(f"batch {b}")),
                              f"one batch of all {len(shuffled)} images")}
        else:
            runs = {f"b{b}_{o}": (run_executor(qvit, source, orders[o], b, policies, cache, say(f"batch {b} {o}")), o)
                    for o in ("shuffled", "sorted")}
        for name, (run, order) in runs.items():
            y = np.array([targets[int(p)] for p in run.index])
            out["runs"][name] = {"batch_size": b, "order": order,
                                 **_summary(run, y, fm, policy.exit_layers, None if b == 1 else ref, n_boot, seed)}
    accs = [r["acc_full"] for r in out["runs"].values()]
    out["acc_full_range"] = [min(accs), max(accs)]
    accs = [r["acc_ee"] for r in out["runs"].values()]
    out["acc_ee_range"] = [min(accs), max(accs)]
    return out
