"""hldx.bench on the tiny shape: the JSON's keys, the ratios made from its measurements, and that every timed
trainer step is Trainer.step itself. No timing thresholds: speed budgets are checked by running the bench."""
from __future__ import annotations

import json
import math

import pytest

from hldx import bench as B
from hldx import config as C
from hldx.budget import memory_per_rank
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

    # Every trainer run is Trainer.step, once per round (1 warm-up + 2 measured); the ranks bench's one-rank
    # NLL step runs in this process too (its two-rank groups in processes of their own).
    assert sorted(phases_stepped) == sorted(["nll", "kd", "hldc", "ht"] * 3 + ["nll"] * 3)
    runs = {"nll", "kd", "hldc", "ht", "bare"}
    assert r["device"].startswith("cpu") and r["precision"] == "fp32"
    assert "mfu" not in r and "peak_mem_gib" not in r  # unknown on a CPU
    assert r["tokens_per_step"] == 4 * 32
    assert set(r["step_s"]) == set(r["flops_per_token"]) == runs
    loads = [f"{m}{h}{g}" for m in ("kd", "hldc", "ht") for h in ("", "_float8_e4m3", "_sr2")
             for g in ("", "_sampled") if not (m == "kd" and h) and not (m == "ht" and g)]
    assert len(loads) == 11  # KD: top-k, sampled; HLDC: both x 3 hidden layouts; HT: 3 hidden layouts
    loaders = {f"loader_host_{x}{n}" for x in loads for n in ("", "_readers2")} | {f"loader_device_{x}" for x in loads}
    ranks = {"ranks_single", "ranks_ddp", "ranks_fsdp"}
    assert set(r["tokens_per_s"]) == runs | loaders | ranks
    assert all(len(r["ranks_s_all"][k.removeprefix("ranks_")]) == 3 for k in ranks)
    for m in runs:
        assert 0 < r["step_s"][m] < 60 and math.isclose(r["tokens_per_s"][m], 128 / r["step_s"][m])
    tps = r["tokens_per_s"]
    gpu = r["gpu_tokens_per_s"]
    assert r["ratio"] == pytest.approx({
        "kd_nll": tps["nll"] / tps["kd"], "hldc_nll": tps["nll"] / tps["hldc"], "ht_nll": tps["nll"] / tps["ht"],
        "trainer_bare": tps["nll"] / tps["bare"]} | {
        k.replace("loader_", "loader_gpu_"): tps[k] / gpu[k.split("_")[2]] for k in loaders if "readers" not in k} | {
        "loader_readers2_vs_1_" + k.removeprefix("loader_host_").removesuffix("_readers2"): tps[k] / tps[k[:-9]]
        for k in loaders if "readers" in k} | {
        f"{m}_single": tps[f"ranks_{m}"] / tps["ranks_single"] for m in ("ddp", "fsdp")})
    # What a student at 40% of an H100's bf16 peak consumes: 0.4 * 989e12 / FLOPs per token.
    f = r["flops_per_token"]
    assert gpu == pytest.approx({m: 0.4 * 989e12 / f[m] for m in ("kd", "hldc", "ht")})
    # FLOPs (exact accounting, cached teacher): KD costs what NLL does; HLDC adds a linear d_S x d_T (64 x 128)
    # regressor, 6 FLOPs per weight per token; HT runs half the layers, no head.
    assert f["kd"] == f["nll"] == f["bare"] and f["hldc"] - f["nll"] == 6 * 64 * 128
    assert r["flop_ratio"] == pytest.approx({"kd_nll": 1.0, "hldc_nll": f["hldc"] / f["nll"],
                                             "ht_nll": f["ht"] / f["nll"]})
    assert 0 < r["flop_ratio"]["ht_nll"] < 0.5


def test_one_method_alone_reports_what_it_can(hldx_cache, tmp_path, capsys):
    out = tmp_path / "kd.json"
    assert B.main(TINY + ["bench.methods=[kd]", "bench.steps=1", f"bench.json={out}"]) == 0
    r = json.loads(out.read_text())
    assert set(r["tokens_per_s"]) == {"kd"} and r["ratio"] == {} and r["flop_ratio"] == {}
    out = tmp_path / "loader.json"
    assert B.main(TINY + ["bench.methods=[loader]", "cache.readers=1", f"bench.json={out}"]) == 0
    r = json.loads(out.read_text())
    assert {k.removeprefix("loader_host_") for k in r["tokens_per_s"] if k.startswith("loader_host_")} == {
        "kd", "kd_sampled", "hldc", "hldc_sampled", "ht", "hldc_float8_e4m3", "hldc_float8_e4m3_sampled",
        "ht_float8_e4m3", "hldc_sr2", "hldc_sr2_sampled", "ht_sr2"} and "step_s" not in r
    assert len(r["tokens_per_s"]) == 22 and all(len(s) == 3 for s in r["loader_s_all"].values())
    text = capsys.readouterr().out  # each run's two sides beside the GPU's appetite, and their ratios to it
    line = next(x for x in text.splitlines() if x.startswith("kd_sampled "))
    host, device, gpu = (float(x.replace(",", "")) for x in line.split()[1:4])
    assert (host, device, gpu) == (round(r["tokens_per_s"]["loader_host_kd_sampled"]),
                                   round(r["tokens_per_s"]["loader_device_kd_sampled"]),
                                   round(r["gpu_tokens_per_s"]["kd"]))


def test_report_medians_mfu_and_memory():
    cfg = C.compose(["train.seq_len=32", "train.batch_size=4"])
    seconds = {"nll": [3.0, 1.0, 2.0], "kd": [2.2, 2.0, 9.0], "bare": [1.0, 1.6, 1.5]}
    r = B.report(cfg, seconds, 1e9, {"kd": 1.5})
    assert r["step_s"] == {"nll": 2.0, "kd": 2.2, "bare": 1.5}
    assert r["tokens_per_s"] == pytest.approx({"nll": 64.0, "kd": 128 / 2.2, "bare": 128 / 1.5})
    assert r["ratio"] == pytest.approx({"kd_nll": 1.1, "trainer_bare": 0.75})
    f = r["flops_per_token"]
    assert r["mfu"] == pytest.approx({m: r["tokens_per_s"][m] * f[m] / 1e9 for m in seconds})
    assert r["peak_mem_gib"] == {"kd": 1.5}
    assert r["plan_mem_gib"] == {"kd": memory_per_rank(C.compose(["train.seq_len=32", "train.batch_size=4", "method=kd"]),
                                                       "none", 1, phase="kd")["total"] / 2**30}


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


@pytest.mark.parametrize("bad, message", [
    (["student=gemma3-123m", "teacher=gemma3-3.4b", "train.seq_len=512", "train.batch_size=1", "bench.threads=1"],
     "train.batch_size=1 is invalid for bench.methods=[..., ranks]: expected an even number"),
    (["train.batch_size=6", "train.micro_batch_size=4"], "train.micro_batch_size=4 is invalid: expected a divisor"),
    (["train.parallel=fsdp", "bench.methods=[nll,kd]"], "train.parallel=fsdp wraps one phase's module at a time"),
])
def test_what_a_run_needs_is_checked_before_any_work(hldx_cache, capsys, monkeypatch, bad, message):
    """The ranks run at batch 1 used to die in its workers after minutes of measuring, with no bench.json."""
    monkeypatch.setattr(B, "data", None)  # nothing may be read or tokenized before the refusal
    assert B.main(bad) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_the_cache_build_against_the_teachers_forward(hldx_cache, tmp_path):
    out = tmp_path / "build.json"
    assert B.main(TINY + ["bench.methods=[build]", "cache.batch_rows=4", f"bench.json={out}"]) == 0
    r = json.loads(out.read_text())
    assert set(r["tokens_per_s"]) == {"build", "build_forward"} and r["build_rows"] == 8 and r["build_batch_rows"] == 4
    assert r["ratio"]["build_forward"] == pytest.approx(r["tokens_per_s"]["build"] / r["tokens_per_s"]["build_forward"])
    assert 0 < r["ratio"]["build_forward"] < 1.5
