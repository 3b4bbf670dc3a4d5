"""GEMM config tuning: keyed on the weight layout and the epilogue, M bucketed, persisted on disk.

The tuner's timing runs on GPU only; here ``bench`` is a stand-in that records what it was asked to time.
"""

import json

import pytest
import torch

from lra_kernels.kernels import _tuning
from lra_kernels.kernels.int8_gemm import _key, default_config, gpu_configs

CANDIDATES = [{"kernel": "tiled", "BLOCK_M": 64, "BLOCK_N": n, "BLOCK_K": 128} for n in (64, 128, 256)]
DEFAULT = {"kernel": "tiled", "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}


class Bench:
    """Fake timings: the candidate with BLOCK_N == ``best`` is fastest; counts calls."""

    def __init__(self, best=128, fail=()):
        self.best, self.fail, self.calls = best, set(fail), 0

    def __call__(self, cfg):
        self.calls += 1
        if cfg["BLOCK_N"] in self.fail:
            raise RuntimeError("out of resources")
        return 1.0 if cfg["BLOCK_N"] == self.best else 2.0


def _fields(M, N=2304, K=768, layout="k-major", **kw):
    return {"op": "int8_gemm", "device": "test", "m_bucket": _tuning.m_bucket(M), "N": N, "K": K, "layout": layout,
            "out": "float16", "residual": None, "activation": "none", "bias": True, **kw}


def test_buckets():
    assert [_tuning.m_bucket(m) for m in (1, 16, 17, 50, 64, 65, 12800)] == [16, 16, 32, 64, 64, 128, 16384]


def test_tunes_once_per_bucket_and_reuses_it(tmp_path):
    cache = _tuning.TuneCache(tmp_path / "t.json")
    bench = Bench(best=256)
    cfg, how = _tuning.choose(cache, _fields(13 * 50), CANDIDATES, bench, True, DEFAULT)
    assert how == "tuned" and cfg["BLOCK_N"] == 256 and bench.calls == 3
    # a compacted batch (11 images instead of 13): same bucket, no timing at all
    cfg2, how2 = _tuning.choose(cache, _fields(11 * 50), CANDIDATES, bench, True, DEFAULT)
    assert (cfg2, how2, bench.calls) == (cfg, "cached", 3)
    assert len(cache.events) == 1 and cache.events[0][2] == 3


def test_key_holds_the_weight_layout_and_epilogue(tmp_path):
    cache = _tuning.TuneCache(tmp_path / "t.json")
    _tuning.choose(cache, _fields(640), CANDIDATES, Bench(best=256), True, DEFAULT)
    for other in (_fields(640, layout="strided"), _fields(640, activation="gelu"), _fields(640, residual="float16")):
        bench = Bench(best=64)
        cfg, how = _tuning.choose(cache, other, CANDIDATES, bench, True, DEFAULT)
        assert how == "tuned" and cfg["BLOCK_N"] == 64 and bench.calls == 3, other
    # and the launcher's key does tell the layouts apart, and buckets M
    q = torch.zeros(650, 48, dtype=torch.int8)
    w = torch.zeros(40, 48, dtype=torch.int8)
    k_major = _key(q, w, None, torch.float16, "none", None, True)
    strided = _key(q, w.t().contiguous().t(), None, torch.float16, "none", None, False)
    assert k_major["layout"] == "k-major" and strided["layout"] == "strided"
    assert _key(q[:550], w, None, torch.float16, "none", None, True) == k_major


def test_persisted_across_processes(tmp_path):
    path = tmp_path / "sub" / "t.json"
    _tuning.choose(_tuning.TuneCache(path), _fields(640), CANDIDATES, Bench(best=64), True, DEFAULT)
    data = json.loads(path.read_text())
    assert data["format"] == _tuning.FORMAT and len(data["entries"]) == 1
    fresh, bench = _tuning.TuneCache(path), Bench(best=256)  # a later process
    cfg, how = _tuning.choose(fresh, _fields(600), CANDIDATES, bench, True, DEFAULT)
    assert how == "cached" and cfg["BLOCK_N"] == 64 and bench.calls == 0
    # a second process's tuning merges into the file rather than overwriting it
    other = _tuning.TuneCache(path)
    other.entries()
    _tuning.choose(_tuning.TuneCache(path), _fields(5000), CANDIDATES, Bench(best=128), True, DEFAULT)
    _tuning.choose(other, _fields(640, N=768), CANDIDATES, Bench(best=128), True, DEFAULT)
    assert len(json.loads(path.read_text())["entries"]) == 3


def test_damaged_cache_file_is_ignored(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    bench = Bench()
    cfg, how = _tuning.choose(_tuning.TuneCache(path), _fields(640), CANDIDATES, bench, True, DEFAULT)
    assert how == "tuned" and bench.calls == 3 and json.loads(path.read_text())["entries"]


def test_no_timing_where_none_may_run(tmp_path):
    # (capturing a CUDA graph, autotuning off): the nearest tuned bucket, else the default; never bench
    cache = _tuning.TuneCache(None)
    bench = Bench()
    assert _tuning.choose(cache, _fields(640), CANDIDATES, bench, False, DEFAULT) == (DEFAULT, "default")
    _tuning.choose(cache, _fields(50), CANDIDATES, Bench(best=64), True, DEFAULT)  # bucket 64
    _tuning.choose(cache, _fields(12800), CANDIDATES, Bench(best=256), True, DEFAULT)  # bucket 16384
    near, how = _tuning.choose(cache, _fields(200), CANDIDATES, bench, False, DEFAULT)  # bucket 256: nearer 64
    assert how == "nearest" and near["BLOCK_N"] == 64 and "m_bucket" not in near
    assert _tuning.choose(cache, _fields(6000), CANDIDATES, bench, False, DEFAULT)[0]["BLOCK_N"] == 256
    assert _tuning.choose(cache, _fields(200, N=768), CANDIDATES, bench, False, DEFAULT)[1] == "default"
    assert bench.calls == 0


def test_failing_candidates_are_skipped(tmp_path):
    cache = _tuning.TuneCache(None)
    cfg, how = _tuning.choose(cache, _fields(640), CANDIDATES, Bench(best=256, fail={256}), True, DEFAULT)
    assert how == "tuned" and cfg["BLOCK_N"] != 256
    assert _tuning.choose(cache, _fields(9000), CANDIDATES, Bench(fail={64, 128, 256}), True, DEFAULT) == (
        DEFAULT, "default")


def test_default_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(_tuning.ENV_PATH, str(tmp_path / "x.json"))
    assert _tuning.default_path() == tmp_path / "x.json"
    assert _tuning.tune_cache() is _tuning.tune_cache(tmp_path / "x.json")
    monkeypatch.setenv(_tuning.ENV_PATH, "")
    assert _tuning.default_path() is None
    monkeypatch.delenv(_tuning.ENV_PATH)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tuning.default_path() == tmp_path / "lra_kernels" / "gemm-tune.json"


@pytest.mark.parametrize("M", (50, 12800))
def test_untuned_default_is_a_candidate(M):
    for tma in (True, False):
        assert default_config(M, tma) in gpu_configs(M, tma)
