"""Fixtures and the summary table of the CPU benchmark (``pytest bench/ --benchmark-only``).

Towers have seeded random weights (no downloads here): fidelity numbers are against the FP32
open_clip tower with the same random weights, not accuracy of real CLIP.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import pytest
import torch

from peers import FP32, OURS, PROVIDERS, platform_info  # bench/ is on sys.path (pytest's default "prepend" import mode)

MODEL = "ViT-B-32"
BATCH = 32
CALIBRATION = 64
RESULTS = pytest.StashKey[dict]()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pytest_addoption(parser):
    parser.addoption(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each timed round, wait up to this many seconds for other processes to leave the "
        "CPU idle (shared machines); 0 disables (default 60)",
    )


def pytest_configure(config):
    torch.set_num_threads(cpu_count())
    config.stash[RESULTS] = {}


# ---------------------------------------------------------------------- other processes' load
def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot (steal counts as busy), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4], sum(v)


def _own_cpu_s() -> float:
    return time.process_time()  # every thread of this process


class OtherLoad:
    """Share of all cores that other processes (and the hypervisor's steal) used since ``start()``."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def start(self) -> None:
        self._ticks, self._own = _cpu_ticks(), _own_cpu_s()

    def share(self) -> float | None:
        now = _cpu_ticks()
        if now is None or self._ticks is None or now[1] == self._ticks[1]:
            return None
        busy = (now[0] - self._ticks[0]) / self.HZ - (_own_cpu_s() - self._own)
        return max(0.0, busy / ((now[1] - self._ticks[1]) / self.HZ))


class QuietGate:
    """pedantic ``setup``/``teardown`` pair: each round starts once other processes have left the CPU
    (nearly) idle for ``window`` seconds, waiting at most ``max_wait`` in all per round; records the
    other processes' share of the CPU during each timed round."""

    def __init__(self, max_wait: float, threshold: float = 0.05, window: float = 0.5):
        self.max_wait, self.threshold, self.window = max_wait, threshold, window
        self.loads: list[float] = []
        self.waited = 0.0
        self._load = OtherLoad()

    def setup(self):
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.max_wait:
            self._load.start()
            time.sleep(self.window)
            share = self._load.share()
            if share is None or share < self.threshold:
                break
        self.waited += time.monotonic() - t0
        self._load.start()

    def teardown(self, *args, **kwargs):
        share = self._load.share()
        if share is not None:
            self.loads.append(share)


@pytest.fixture
def quiet_gate(request) -> QuietGate:
    return QuietGate(request.config.getoption("--quiet-wait"))


@dataclass
class Tower:
    name: str
    visual: torch.nn.Module
    reference: torch.Tensor  # FP32 open_clip embeddings of the `images` batch
    workdir: object  # exports of this tower (ONNX, OpenVINO IR), reused within the session


@pytest.fixture(scope="session")
def threads() -> int:
    return torch.get_num_threads()


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(BATCH, 3, 224, 224, generator=gen)


@pytest.fixture(scope="session")
def calibration_images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(4321)
    return torch.randn(CALIBRATION, 3, 224, 224, generator=gen)


def _tower(name, visual, images, tmp_path_factory) -> Tower:
    with torch.inference_mode():
        reference = visual(images).float()
    return Tower(name, visual, reference, tmp_path_factory.mktemp(f"exports-{name}"))


@pytest.fixture(scope="session")
def random_tower(images, tmp_path_factory):
    from lra_ee.synthetic import random_tower

    tower = _tower("random", random_tower(MODEL, seed=0), images, tmp_path_factory)
    yield tower
    shutil.rmtree(tower.workdir, ignore_errors=True)  # ~0.7 GB of exports per tower


@pytest.fixture(scope="session")
def outlier_tower(images, tmp_path_factory):
    """The same random tower with trained-CLIP-like activation outlier channels planted."""
    from lra_ee.synthetic import plant_outlier_channels, random_tower

    visual = random_tower(MODEL, seed=0)
    plant_outlier_channels(visual)
    tower = _tower("outlier", visual, images, tmp_path_factory)
    yield tower
    shutil.rmtree(tower.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def results(request) -> dict:
    """provider -> measurements (or ``{"skipped": reason}``), printed by the summary hook."""
    return request.config.stash[RESULTS]


# ---------------------------------------------------------------------- summary table
def _fmt(v, spec):
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(RESULTS, {})
    if not results:
        return
    ours = results.get(OURS, {}).get("img_per_s")
    fp32 = results.get(FP32, {}).get("img_per_s")
    tr = terminalreporter
    tr.section(f"CPU {MODEL} visual, batch {BATCH}, {torch.get_num_threads()} threads (random-weight towers)")
    info = platform_info()
    tr.write_line(f"{info['cpu']}; CPU kernels: {info['cpu_kernels']}; torch {info['torch']}")
    head = (
        f"{'provider':<22} {'img/s':>7} {'ours/peer':>9} {'peer/fp32':>9} {'cos fp32':>9} {'cos outlier':>11} "
        f"{'others':>6}"
    )
    tr.write_line(head)
    tr.write_line("-" * len(head))
    for name in PROVIDERS:
        r = results.get(name)
        if r is None:
            continue
        if "skipped" in r:
            tr.write_line(f"{name:<22} skipped: {r['skipped']}")
            continue
        ips = r.get("img_per_s")
        vs_ours = ours / ips if ours and ips else None
        vs_fp32 = ips / fp32 if fp32 and ips else None
        tr.write_line(
            f"{name:<22} {_fmt(ips, '7.1f')} {_fmt(vs_ours, '9.2f')} {_fmt(vs_fp32, '9.2f')} "
            f"{_fmt(r.get('cosine_fp32'), '9.5f')} {_fmt(r.get('cosine_fp32_outlier_tower'), '11.5f')} "
            f"{_fmt(r.get('other_load_best_round'), '6.0%')}"
        )
    tr.write_line(
        f"img/s: best of the timed rounds; ours = {OURS}; cos: mean cosine to the FP32 open_clip "
        "embedding of the same tower (random weights / planted outlier channels); others: CPU share "
        "other processes used during the best round"
    )
