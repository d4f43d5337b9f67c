"""Bad input fails before any training, with a message naming the key and what is allowed."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from hldx import config as C
from hldx.job import check
from hldx.study import plan_sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("overrides, message", [
    (["lr=0"], r"lr=0 is invalid: expected a number > 0"),
    (["lr=-1e-3"], r"lr=-0.001 is invalid"),
    (["method=kd", "tau=0"], r"tau=0 is invalid: expected a number > 0"),
    (["method=kd", "alpha=1.5"], r"alpha=1.5 is invalid: expected a number in \[0, 1\]"),
    (["method=hldc", "gamma=-0.1"], r"gamma=-0.1 is invalid: expected a number >= 0"),
    (["method=hldf", "p1=1"], r"p1=1 is invalid: expected a number in \[0, 1\)"),
    (["method=hldf", "p1=0"], r"p1=0 .* use method=kd"),
    (["budget.tokens=10"], r"too small for one optimizer step .* raise the budget"),
    (["budget.tokens=-5"], r"budget.tokens=-5 is invalid"),
    (["budget.tokens=null"], r"budget=none set is invalid: expected one of budget.flops"),
    (["train.seq_len=4096"], r"train.seq_len=4096 is invalid: expected at most student.max_position_embeddings"),
    (["data.path=/no/such/corpus"], r"data.path=/no/such/corpus is invalid: expected a readable directory"),
    (["method=kd", "teacher.model.vocab_size=8192"], r"must share a tokenizer: teacher.model.vocab_size=8192"),
    (["budget.accounting=rough"], r"budget.accounting=rough is invalid: expected exact or paper"),
    # Accepted (and trained) before the schema: every key's type and range is now checked before any work.
    (["train.precision=fp8"], r"train.precision=fp8 is invalid: expected one of auto, bf16, fp32"),
    (["train.grad_clip=-1"], r"train.grad_clip=-1 is invalid: expected a number > 0 or null"),
    (["train.warmup_steps=-10"], r"train.warmup_steps=-10 is invalid: expected an integer >= 0"),
    (["train.final_lr_fraction=2"], r"train.final_lr_fraction=2 is invalid: expected a number in \[0, 1\]"),
    (["train.weight_decay=-1"], r"train.weight_decay=-1 is invalid: expected a number >= 0"),
    (["teacher.source=bogus"], r"teacher.source=bogus is invalid: expected cache or online"),
    (["seed=abc"], r"seed=abc is invalid: expected an integer"),
    (["train.betas=[0.9]"], r"train.betas=\[0.9\] is invalid: expected two numbers, each in \[0, 1\)"),
    (["cache.values_dtype=int4"], r"cache.values_dtype=int4 is invalid: expected one of bfloat16, float16, float32"),
    (["cache.hidden_rows=some"], r"cache.hidden_rows=some is invalid: expected auto or all or a row count >= 0"),
    (["method=hldc", "hidden.student_layer=9"], r"hidden.student_layer=9 is invalid: expected null .* 1..4"),
    (["method=hldc", "hidden.teacher_layer=7"], r"hidden.teacher_layer=7 is invalid: expected null .* 1..6"),
    # Layer pairs, their weights and adapters (hldx.hidden): a layer the student or the teacher lacks, a pair given
    # twice, weights that do not match the pairs, identity between different widths.
    (["method=hldc", "hidden.pairs=[[9,3]]"], r"hidden.pairs=\[\[9,3\]\] is invalid: expected \[student_layer, "
     r"teacher_layer\] pairs of the student's layers 0..4 and the teacher's 0..6 \(0: the embedding output\); "
     r"\[9, 3\] is not one"),
    (["method=hldf", "hidden.pairs=[[1,2],[2,7]]"], r"hidden.pairs=\[\[1,2\],\[2,7\]\] is invalid: .*\[2, 7\] is not one"),
    (["method=hldc", "hidden.pairs=[[1,2],[1,2]]"], r"hidden.pairs=\[\[1,2\],\[1,2\]\] is invalid: expected distinct "
     r"pairs \(\[1,2\] is given twice\)"),
    (["method=hldc", "hidden.pairs=[2,3]"], r"hidden.pairs=\[2, 3\] is invalid: expected a non-empty list of "
     r"\[student_layer, teacher_layer\] pairs of layers >= 0 or null"),
    (["method=hldc", "hidden.pairs=[[1,2]]", "hidden.student_layer=1"], r"hidden.pairs=\[\[1,2\]\] is invalid: give "
     r"the layers either as hidden.pairs or as hidden.student_layer/hidden.teacher_layer \(one pair\), not both"),
    (["method=hldc", "hidden.pairs=[[1,2],[3,5]]", "hidden.weights=[1]"], r"hidden.weights=\[1\] is invalid: "
     r"expected one weight > 0 per pair of hidden.pairs \(2\), summing to 1"),
    (["method=hldf", "hidden.pairs=[[1,2],[3,5]]", "hidden.weights=[0.5,0.6]"], r"hidden.weights=\[0.5,0.6\] is invalid"),
    (["method=hldc", "hidden.weights=[-1]"], r"hidden.weights=\[-1\] is invalid: expected a non-empty list of "
     r"numbers, each > 0 or null"),
    (["method=hldf", "hidden.adapter=identity"], r"hidden.adapter=identity is invalid: expected linear or mlp: "
     r"identity needs the student's width to be the teacher's \(student.hidden_size=64, teacher.model.hidden_size=128\)"),
    (["method=hldc", "hidden.adapter=conv"], r"hidden.adapter=conv is invalid: expected one of linear, mlp, identity "
     r"or null"),
    (["teacher.build.tokens=100"], r"the on-demand teacher \(teacher.build.tokens=100.*too small for one"),
])
def test_bad_values_are_refused_before_training(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        check(C.compose(overrides), launch=False)


@pytest.mark.parametrize("group, value, option", [("method", "fitnet", "hldf"), ("student", "gpt2", "gemma3-123m"),
                                                  ("data", "pile", "c4")])
def test_unknown_group_choice_lists_the_options(group, value, option):
    with pytest.raises(C.ConfigError, match=f"{group}={value} is invalid: expected one of .*{option}"):
        C.compose([f"{group}={value}"])


def test_cli_fails_before_training_and_names_the_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hldx.run", "alpha=2", f"paths.runs={tmp_path}/runs",
                           f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "alpha=2 is invalid: expected a number in [0, 1]" in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_sweep_with_bad_jobs_launches_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hldx.run", "-m", "method=nll,kd", "lr=1e-3,-1",
                           f"paths.runs={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "2 invalid job(s) in the sweep; nothing was launched" in done.stderr
    assert "lr=-1 is invalid: expected a number > 0 (2 jobs, e.g. method=nll lr=-1)" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_key_in_a_sweep_is_named():
    _, errors = plan_sweep(["method=nll,kd", "lr=1e-3", "train.sequence_length=64"])
    assert len(errors) == 2 and all("train.sequence_length=64 is invalid: there is no such key in train" in e
                                    for e in errors)


def test_ignored_hyperparameter_given_explicitly_is_warned_once(caplog):
    with caplog.at_level(logging.WARNING):
        C.warn_unused(C.compose(["method=hldf", "gamma=0.3"]), ["method=hldf", "gamma=0.3"])
        C.warn_unused(C.compose(["method=hldc", "p1=0.2"]), ["method=hldc", "p1=0.2"])
        C.warn_unused(C.compose(["method=hldc", "gamma=0.2"]), ["method=hldc", "gamma=0.2"])
    assert [r.getMessage() for r in caplog.records] == [
        "method=hldf ignores gamma: gamma=0.3 has no effect on this run",
        "method=hldc ignores p1: p1=0.2 has no effect on this run"]


def test_teacher_with_another_hidden_size_is_refused(tmp_path):
    from hldx.models import build_model
    from hldx.teacher import load_teacher

    cfg = C.compose(["method=hldc", f"teacher.ckpt={tmp_path}"])
    build_model(cfg.teacher.model, seed=0).save_pretrained(tmp_path)
    load_teacher(cfg)  # the matching shape loads
    wrong = C.compose(["method=hldc", f"teacher.ckpt={tmp_path}", "teacher.model.hidden_size=256"])
    with pytest.raises(C.ConfigError, match=r"has hidden_size=128 but teacher.model.hidden_size=256"):
        load_teacher(wrong)
    with pytest.raises(C.ConfigError, match=r"has hidden_size=128 but teacher.model.hidden_size=256"):
        check(wrong, launch=True)  # before anything runs: from its config.json, no weights loaded


def test_teacher_with_another_tokenizer_is_refused_before_launch(hldx_cache, tmp_path):
    """The tokenizer saved with teacher.ckpt against the data's, by content digest (not only its size)."""
    from transformers import PreTrainedTokenizerFast

    from hldx import data
    from hldx.models import build_model

    cfg = C.compose(["method=kd", f"teacher.ckpt={tmp_path}"])
    build_model(cfg.teacher.model, seed=0).save_pretrained(tmp_path)
    ours = data.tokenizer_for(cfg)
    ours.save_pretrained(tmp_path)
    check(cfg, launch=True)  # the same tokenizer: accepted
    state = json.loads(ours.backend_tokenizer.to_str())
    first, second = list(state["model"]["vocab"])[300:302]  # two learnt tokens swap ids: same size, other ids
    state["model"]["vocab"][first], state["model"]["vocab"][second] = (state["model"]["vocab"][second],
                                                                       state["model"]["vocab"][first])
    (tmp_path / "tokenizer.json").write_text(json.dumps(state))
    assert len(PreTrainedTokenizerFast.from_pretrained(str(tmp_path))) == len(ours)
    with pytest.raises(C.ConfigError, match="was trained with another tokenizer than data=embedded's"):
        check(cfg, launch=True)


def test_the_teachers_identity_is_the_teachers(monkeypatch, tmp_path):
    """Students differing in everything of their own share one on-demand teacher; two recipes make two."""
    from hldx.teacher import teacher_config, teacher_path
    from hldx.tracking import run_name

    monkeypatch.setenv("HLDX_CACHE", str(tmp_path))
    students = [["method=kd", "seed=0"],
                ["method=hldf", "seed=1", "lr=1e-3", "alpha=0.9", "tau=2", "p1=0.1", "budget.tokens=1e6",
                 "train.batch_size=8", "train.seq_len=64", "train.warmup_steps=10", "train.weight_decay=0"],
                ["method=hldc", "seed=2", "gamma=0.3", "budget.flops=1e12"]]
    paths = {teacher_path(C.compose(s)) for s in students}
    assert len(paths) == 1 and paths.pop().is_relative_to(tmp_path / "teachers")
    recipes = {teacher_path(C.compose(["method=kd", f"teacher.build.tokens={t}"])) for t in (500000, 600000)}
    assert len(recipes) == 2
    assert teacher_path(C.compose(["method=kd", "teacher.build.seed=1"])) != \
        teacher_path(C.compose(["method=kd"]))
    assert run_name(teacher_config(C.compose(students[1])), "teacher") == "teacher|tiny-teacher|tokens=5e5|lr=3e-3"
