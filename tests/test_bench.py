"""hldx.bench on the tiny shape: the JSON's keys, the ratios made from its measurements, and that every timed
trainer step is Trainer.step itself. No timing thresholds: speed budgets are checked by running the bench."""
from __future__ import annotations

import json
import math

import pytest

from hldx import bench as B
from hldx import config as C
from hldx.train import Trainer

TINY = ["train.seq_len=32", "train.batch_size=4", "data.max_train_tokens=32768", "bench.warmup=1", "bench.steps=2"]


def test_bench_json_holds_the_measured_rates_and_their_ratios(hldx_cache, tmp_path, monkeypatch):
    phases_stepped = []
    step = Trainer.step

    def spy(self, phase, *args):
        phases_stepped.append(phase.name)
        return step(self, phase, *args)

    monkeypatch.setattr(Trainer, "step", spy)
    out = tmp_path / "bench.json"
    assert B.main(TINY + [f"bench.json={out}"]) == 0
    r = json.loads(out.read_text())

    # Every trainer run is Trainer.step, once per round (1 warm-up + 2 measured).
    assert sorted(phases_stepped) == sorted(["nll", "kd", "hldc", "ht"] * 3)
    runs = {"nll", "kd", "hldc", "ht", "bare"}
    assert r["device"].startswith("cpu") and r["precision"] == "fp32"
    assert "mfu" not in r and "peak_mem_gib" not in r  # unknown on a CPU
    assert r["tokens_per_step"] == 4 * 32
    assert set(r["step_s"]) == set(r["tokens_per_s"]) == set(r["flops_per_token"]) == runs
    assert set(r["loader_tokens_per_s"]) == runs - {"bare"}
    for m in runs:
        assert 0 < r["step_s"][m] < 60 and math.isclose(r["tokens_per_s"][m], 128 / r["step_s"][m])
    tps, loader = r["tokens_per_s"], r["loader_tokens_per_s"]
    assert r["ratio"] == pytest.approx({
        "kd_nll": tps["nll"] / tps["kd"], "hldc_nll": tps["nll"] / tps["hldc"], "ht_nll": tps["nll"] / tps["ht"],
        "trainer_bare": tps["nll"] / tps["bare"], "loader_trainer": min(loader[m] / tps[m] for m in loader)})
    # FLOPs (exact accounting, cached teacher): KD costs what NLL does; HLDC adds a linear d_S x d_T (64 x 128)
    # regressor, 6 FLOPs per weight per token; HT runs half the layers, no head.
    f = r["flops_per_token"]
    assert f["kd"] == f["nll"] == f["bare"] and f["hldc"] - f["nll"] == 6 * 64 * 128
    assert r["flop_ratio"] == pytest.approx({"kd_nll": 1.0, "hldc_nll": f["hldc"] / f["nll"],
                                             "ht_nll": f["ht"] / f["nll"]})
    assert 0 < r["flop_ratio"]["ht_nll"] < 0.5


def test_one_method_alone_reports_what_it_can(hldx_cache, tmp_path):
    out = tmp_path / "kd.json"
    assert B.main(TINY + ["bench.methods=[kd]", "bench.steps=1", f"bench.json={out}"]) == 0
    r = json.loads(out.read_text())
    assert set(r["tokens_per_s"]) == {"kd"} and set(r["loader_tokens_per_s"]) == {"kd"}
    assert r["ratio"] == pytest.approx({"loader_trainer": r["loader_tokens_per_s"]["kd"] / r["tokens_per_s"]["kd"]})
    assert r["flop_ratio"] == {}


def test_report_medians_mfu_and_memory():
    cfg = C.compose(["train.seq_len=32", "train.batch_size=4"])
    seconds = {"nll": [3.0, 1.0, 2.0], "kd": [2.2, 2.0, 9.0], "bare": [1.0, 1.6, 1.5]}
    r = B.report(cfg, seconds, {"nll": [0.01], "kd": [0.02, 0.04, 0.5]}, 1e9, {"kd": 1.5})
    assert r["step_s"] == {"nll": 2.0, "kd": 2.2, "bare": 1.5}
    assert r["tokens_per_s"] == pytest.approx({"nll": 64.0, "kd": 128 / 2.2, "bare": 128 / 1.5})
    assert r["ratio"] == pytest.approx({"kd_nll": 1.1, "trainer_bare": 0.75,
                                        "loader_trainer": min(12800 / 64.0, 3200 / (128 / 2.2))})
    f = r["flops_per_token"]
    assert r["mfu"] == pytest.approx({m: r["tokens_per_s"][m] * f[m] / 1e9 for m in seconds})
    assert r["peak_mem_gib"] == {"kd": 1.5}


def test_measure_rotates_the_order_and_drops_the_warmup():
    import torch

    calls = []
    runs = {name: (lambda r, name=name: calls.append((r, name))) for name in "abc"}
    seconds, peak = B.measure(runs, rounds=4, warmup=1, device=torch.device("cpu"))
    assert [name for _, name in calls] == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3, "c": 3} and peak == {}


@pytest.mark.parametrize("bad, key", [("bench.methods=[kd,lm]", "bench.methods"), ("bench.steps=0", "bench.steps")])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(C.ConfigError, match=key):
        B.bench(C.compose(TINY + [bad]))
