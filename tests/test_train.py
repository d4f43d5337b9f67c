"""The trainer end to end on tiny runs: MLflow names, exact resume, the schedule, HLDC/HLDF semantics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from hldx import config as C
from hldx import losses
from hldx.methods import phases
from hldx.budget import plan_run
from hldx.job import execute
from hldx.models import PhaseNet, build_model, build_regressor
from hldx.train import Checkpoint, adam_sqrt_v_percentiles, lr_at

ROOT = Path(__file__).resolve().parent.parent


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run_dir / "final").glob("*.safetensors"))))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run(overrides: list[str]) -> tuple[dict, Path]:
    cfg = C.compose(overrides)
    metrics = execute(cfg)
    return metrics, Path(cfg.paths.runs) / C.run_key(cfg)


def test_kd_run_logs_the_design_names_and_is_skipped_when_finished(tiny, tmp_path):
    overrides = tiny + ["method=kd", f"paths.cache={tmp_path}/cache"]  # its own teacher, built and tracked here
    metrics, run_dir = _run(overrides)
    assert metrics["eval/val_logppl"] < torch.log(torch.tensor(4096.0)).item()  # learnt something
    cfg = C.compose(overrides)
    mlflow = MlflowClient(cfg.tracking.uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                filter_string="tags.`hldx.role` = 'student'")
    assert run.info.status == "FINISHED" and run.info.run_name == "kd|lr=4e-4|tau=1|alpha=0.7"
    assert {k: run.data.params[k] for k in ("method", "student", "lr", "tau", "alpha", "seed")} == {
        "method": "kd", "student": "tiny", "lr": "0.0004", "tau": "1.0", "alpha": "0.7", "seed": "0"}
    assert "gamma" not in run.data.params and "p1" not in run.data.params
    assert run.data.params["cfg.train.seq_len"] == "32"
    assert run.data.tags["hldx.hp_key"] == "lr=4e-4|tau=1|alpha=0.7"
    assert run.data.tags["hldx.run_key"] == C.run_key(cfg) and run.data.tags["hldx.method"] == "kd"
    assert Path(run.data.tags["hldx.ckpt"]) == (run_dir / "final").resolve()
    for name in ("train/loss", "train/loss_nll", "train/loss_kd", "train/lr", "train/tokens", "train/flops",
                 "perf/tokens_per_s", "eval/val_logppl"):
        assert name in run.data.metrics, name
    steps = plan_run(cfg).phases[0].steps
    assert run.data.metrics["train/tokens"] == steps * 4 * 32
    # The teacher was pre-trained once by the same code path and is tracked too.
    teachers = mlflow.search_runs([run.info.experiment_id], filter_string="tags.`hldx.role` = 'teacher'")
    assert [(t.data.params["method"], t.data.params["student"]) for t in teachers] == [("nll", "tiny-teacher")]
    # The same command again finds the finished run and trains nothing.
    assert execute(cfg) == {}


def _kill_after_checkpoint(cmd: list[str], env: dict, run_dir: Path) -> None:
    """Start cmd, SIGKILL it once it has written a checkpoint inside its first phase."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (state := Checkpoint.load(run_dir)) is None or state.step == 0:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkilled_run_resumes_to_bitwise_identical_weights(tiny, tmp_path):
    base = tiny + ["method=nll", "budget.tokens=8192", "train.ckpt_every=10"]
    _, reference = _run(base + [f"paths.runs={tmp_path}/reference"])
    env = dict(os.environ)
    killed = [f"paths.runs={tmp_path}/killed", f"tracking.uri=sqlite:///{tmp_path}/killed.db"]
    cmd = [sys.executable, "-m", "hldx.run"] + base + killed
    run_dir = tmp_path / "killed" / reference.name
    _kill_after_checkpoint(cmd, env, run_dir)
    assert not (run_dir / "final").exists()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    _assert_bitwise_equal(_weights(reference), _weights(run_dir))
    mlflow = MlflowClient(C.compose(base + killed).tracking.uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(C.compose(base).tracking.experiment).experiment_id],
                              filter_string=f"tags.`hldx.run_key` = '{reference.name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run continued its MLflow run


def test_hldc_with_gamma_zero_is_kd_bitwise(tiny):
    common = tiny + ["budget.tokens=4096"]
    _, kd = _run(common + ["method=kd"])
    _, hldc = _run(common + ["method=hldc", "gamma=0"])
    _assert_bitwise_equal(_weights(kd), _weights(hldc))
    _, hldc_on = _run(common + ["method=hldc", "gamma=1"])
    assert not torch.equal(_weights(kd)["model.norm.weight"], _weights(hldc_on)["model.norm.weight"])
    # Each HLDC run, finished after its KD partner, compares itself with it in MLflow: KD's value minus its own.
    cfg = C.compose(common)
    mlflow = MlflowClient(cfg.tracking.uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (kd_run,), (same,), (on,) = (mlflow.search_runs([exp], filter_string=f"tags.`hldx.run_key` = '{d.name}'")
                                 for d in (kd, hldc, hldc_on))
    assert same.data.metrics["vs_kd/eval/val_logppl"] == 0.0 and same.data.tags["hldx.kd_run"] == kd_run.info.run_id
    assert on.data.metrics["vs_kd/eval/val_logppl"] == pytest.approx(
        kd_run.data.metrics["eval/val_logppl"] - on.data.metrics["eval/val_logppl"])
    assert "vs_kd/eval/val_logppl" not in kd_run.data.metrics


class _Interrupt(Exception):
    pass


def test_hldf_resumes_across_the_phase_boundary(tiny, tmp_path, monkeypatch):
    """Killed in phase 1, at the boundary and in phase 2, HLDF ends with the uninterrupted run's weights."""
    overrides = tiny + ["method=hldf", "p1=0.3", "budget.tokens=4096", "train.ckpt_every=3"]
    cfg = C.compose(overrides)
    p1_steps = plan_run(cfg).phases[0].steps
    _, reference = _run(overrides + [f"paths.runs={tmp_path}/reference"])
    save = Checkpoint.save
    for stop_at in (3, p1_steps, p1_steps + 6):
        def save_then_stop(state, run_dir, write_state=None):
            save(state, run_dir, write_state)
            if sum(p.steps for p in plan_run(cfg).phases[:state.phase]) + state.step >= stop_at:
                raise _Interrupt  # as if killed right after this checkpoint

        killed = overrides + [f"paths.runs={tmp_path}/killed-{stop_at}"]
        monkeypatch.setattr(Checkpoint, "save", save_then_stop)
        with pytest.raises(_Interrupt):
            _run(killed)
        monkeypatch.setattr(Checkpoint, "save", save)
        _, resumed = _run(killed)
        _assert_bitwise_equal(_weights(reference), _weights(resumed))


def test_schedule_warmup_cosine_and_hldf_alignment():
    cfg = C.compose(["method=hldf", "p1=0.25", "budget.tokens=409600", "train.warmup_steps=10"])
    ht, kd2 = plan_run(cfg).phases
    p_ht, p_kd = phases(cfg)
    lr = [lr_at(1.0, 0.1, p_ht, ht, s) for s in range(ht.steps)]
    assert lr[0] == pytest.approx(1 / ht.warmup_steps) and lr[-1] == 1.0 and max(lr) == 1.0  # constant
    kd_cfg = C.compose(["method=kd", "budget.tokens=409600", "train.warmup_steps=10"])
    (kd,) = plan_run(kd_cfg).phases
    kd_lr = [lr_at(1.0, 0.1, phases(kd_cfg)[0], kd, s) for s in range(kd.steps)]
    assert kd_lr[kd.warmup_steps - 1] == 1.0 and kd_lr[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(kd_lr[kd.warmup_steps:], kd_lr[kd.warmup_steps + 1:]))
    hldf_lr = [lr_at(1.0, 0.1, p_kd, kd2, s) for s in range(kd2.steps)]
    assert hldf_lr[0] < 0.5  # re-warms up
    assert hldf_lr[-1] == pytest.approx(kd_lr[-1], abs=1e-3)  # and ends where KD ends


@pytest.mark.parametrize("method", ["kd", "hldc"])
def test_cached_teacher_gives_the_online_teachers_weights(tiny, tmp_path, method):
    """With lossless (float32) storage the cache returns what the teacher computed: same final weights.

    An online teacher's forward is charged to the budget, so the cached run gets the budget that buys
    it the same number of steps."""
    common = tiny + [f"method={method}", "cache.values_dtype=float32", "cache.hidden_dtype=float32"]
    online_cfg = C.compose(common + ["teacher.source=online", f"paths.runs={tmp_path}/online"])
    steps = plan_run(online_cfg).phases[0].steps
    cached = common + ["teacher.source=cache", "budget.tokens=null"]
    per_token = plan_run(C.compose(cached + ["budget.flops=1e12"])).flops_per_token[method]
    cached.append(f"budget.flops={steps * 4 * 32 * per_token!r}")
    assert plan_run(C.compose(cached)).phases[0].steps == steps
    _, online = _run(common + ["teacher.source=online", f"paths.runs={tmp_path}/online"])
    _, from_cache = _run(cached)
    _assert_bitwise_equal(_weights(online), _weights(from_cache))


def test_adam_sqrt_v_percentiles_follow_adams_recurrence():
    """sqrt(v_hat) from AdamW's state against the recurrence v <- b2 v + (1 - b2) g^2 kept here by hand."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50, 20))
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95))
    v = torch.zeros_like(w, dtype=torch.float64)
    for step in range(1, 4):
        loss = (w ** 3).sum() * step
        loss.backward()
        v = 0.95 * v + 0.05 * w.grad.double() ** 2
        opt.step()
        opt.zero_grad()
    root = (v / (1 - 0.95 ** 3)).sqrt().flatten().sort().values
    p10, p50 = adam_sqrt_v_percentiles(opt)
    assert p10 == pytest.approx(float(root[99]), rel=1e-5) and p50 == pytest.approx(float(root[499]), rel=1e-5)


def test_summed_hidden_loss_escapes_adams_eps_in_a_toy_phase_1():
    """HLDF's phase-1 module (the tiny student's bottom, the MLP to d_T = 2,560) on a learnable target (each
    token's random vector plus half its predecessor's), 150 AdamW steps at eps = 1e-8: the paper's mse leaves
    sqrt(v) at the order of eps, and reaches a lower held-out cosine than mse_sum; cosine = mse_sum / 2, the
    same steps up to eps."""
    cfg = C.compose([])
    s, d_teacher = cfg.student, 2560
    g = torch.Generator().manual_seed(0)
    vectors_VxD = torch.randn(s.vocab_size, d_teacher, generator=g)
    train_NxL, held_NxL = torch.randint(0, 64, (64, 32), generator=g), torch.randint(0, 64, (16, 32), generator=g)

    def target(tokens_BxL):
        return vectors_VxD[tokens_BxL] + 0.5 * vectors_VxD[torch.roll(tokens_BxL, 1, dims=1)]

    result = {}
    flush = torch.set_flush_denormal(True)  # mse's gradients are tiny: subnormal floats would be slow here
    try:
        for kind in ("mse", "mse_sum", "cosine"):
            torch.manual_seed(0)
            net = PhaseNet(build_model(s, 0), [s.num_hidden_layers // 2],
                           [build_regressor("mlp", s.hidden_size, d_teacher)], bottom=True)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
            for step in range(150):
                batch_BxL = train_NxL[(step % 16) * 4:(step % 16 + 1) * 4]
                losses.hidden_loss(net(batch_BxL)[1][0], target(batch_BxL), kind).backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(net(held_NxL)[1][0], target(held_NxL), dim=-1).mean()
            result[kind] = (float(cos), *adam_sqrt_v_percentiles(opt))
    finally:
        torch.set_flush_denormal(flush)
    print({k: f"cos {c:.4f} sqrt_v p10 {p10:.2e} p50 {p50:.2e}" for k, (c, p10, p50) in result.items()})
    assert result["mse"][2] < 10 * 1e-8 < result["mse_sum"][1]  # mse: in eps's regime; mse_sum: far above it
    assert result["mse_sum"][0] > result["mse"][0] + 0.002
    assert result["cosine"][0] == pytest.approx(result["mse_sum"][0], abs=2e-3)


def test_a_log_that_is_not_a_terminal_gets_a_line_per_log_step(tiny, tmp_path):
    """As in a SLURM log: the step, the loss, tokens/s and the time left, every train.log_every steps."""
    overrides = tiny + ["method=nll", f"paths.runs={tmp_path}/runs", "train.log_every=8"]
    done = subprocess.run([sys.executable, "-m", "hldx.run", *overrides, f"hydra.run.dir={tmp_path}/out"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = plan_run(C.compose(overrides)).phases[0].steps
    lines = [line for line in done.stderr.splitlines() if ("step/s" in line or "s/step" in line) and "loss=" in line]
    assert len(lines) == steps // 8 + (steps % 8 > 0) + 1  # each log step, and the last count when it closes
    assert f" 8/{steps} [" in lines[0] and "<" in lines[0] and "tok_s=" in lines[0]  # elapsed<left, tokens/s
    assert "\r" not in done.stderr


def test_the_hidden_path_logs_its_fit_and_learns(tiny):
    """HLDF logs phase 1's held-out fit (the cosine of the regressor's output with the teacher's state on the
    step after phase 1, whose rows phase 1 never trains on) at its start and end; HLDC its loss_emb at the first
    and last step. The start is checked against the cosine computed here from the initial student, regressor
    and teacher; both paths learn."""
    from hldx import data, order, teacher
    from hldx.models import forward_to_layer

    common = tiny + ["cache.values_dtype=float32", "cache.hidden_dtype=float32", "budget.tokens=8192", "gamma=1"]
    _run(common + ["method=hldf", "p1=0.5"])
    _run(common + ["method=hldc"])
    cfg = C.compose(common + ["method=hldf", "p1=0.5"])
    mlflow = MlflowClient(cfg.tracking.uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (hldf,), (hldc,) = (mlflow.search_runs([exp], filter_string=f"tags.`hldx.method` = '{m}'") for m in ("hldf", "hldc"))
    fit, emb = hldf.data.metrics, hldc.data.metrics
    assert fit["hidden/cosine_end"] > fit["hidden/cosine_start"] + 0.1
    assert emb["hidden/loss_emb_end"] < emb["hidden/loss_emb_start"]

    steps = plan_run(cfg).phases[0].steps
    rows = order.training_rows(cfg, data.prepare(cfg, "train", data.tokenizer_for(cfg)))
    tokens_BxL, _ = order.Batches(rows, cfg.train.batch_size).batch(steps)
    student = build_model(cfg.student, cfg.seed)
    torch.manual_seed(cfg.seed + 1)
    regressor = build_regressor("mlp", cfg.student.hidden_size, cfg.teacher.model.hidden_size)
    with torch.no_grad():
        predicted = regressor(forward_to_layer(student, tokens_BxL, cfg.student.num_hidden_layers // 2))
        target = forward_to_layer(teacher.load_teacher(cfg), tokens_BxL, cfg.teacher.model.num_hidden_layers // 2)
    cosine = torch.nn.functional.cosine_similarity(predicted, target, dim=-1).mean()
    assert fit["hidden/cosine_start"] == pytest.approx(float(cosine), abs=1e-5)


def test_the_fit_of_several_pairs_is_logged_per_pair(tiny):
    """With pairs (1, 2) and (3, 5) weighted (0.3, 0.7): HLDF's held-out cosine and HLDC's loss_emb, in all (the
    pairs' weighted mean, the weighted loss) and per pair, at the start and end."""
    pairs = tiny + ["hidden.pairs=[[1,2],[3,5]]", "hidden.weights=[0.3,0.7]", "p1=0.5"]
    _run(pairs + ["method=hldf"])
    _run(pairs + ["method=hldc"])
    cfg = C.compose(pairs)
    mlflow = MlflowClient(cfg.tracking.uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (hldf,), (hldc,) = (mlflow.search_runs([exp], filter_string=f"tags.`hldx.method` = '{m}'") for m in ("hldf", "hldc"))
    for run, name in ((hldf, "hidden/cosine"), (hldc, "hidden/loss_emb")):
        m = run.data.metrics
        for when in ("start", "end"):
            each = m[f"{name}_{when}_s1_t2"], m[f"{name}_{when}_s3_t5"]
            assert m[f"{name}_{when}"] == pytest.approx(0.3 * each[0] + 0.7 * each[1], rel=1e-6), (name, when)
        assert run.data.params["hidden"] == "pairs=[[1,2],[3,5]]|weights=[0.3,0.7]"
    assert hldc.data.metrics["train/loss_emb_s3_t5"] > 0
