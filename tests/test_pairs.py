"""Layer pairs, their weights and adapters (hldx.hidden): the hidden loss of several pairs, HLDC at gamma=0 as KD,
HLDF's phase 1 computing nothing above its deepest pair, the run keys they make, a sweep over them, and today's
keys, cache identities and numbers as they were before pairs existed."""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hldx import config as C
from hldx import hidden, losses, teacher
from hldx.budget import flops_per_token, plan_run
from hldx.job import check, execute
from hldx.loader import Micro
from hldx.methods import phases
from hldx.models import build_model, build_regressor, count_parameters
from hldx.order import Rows
from hldx.plan import main as plan_main
from hldx.stages import stages
from hldx.study import expand_sweep, plan_jobs
from hldx.teacher import OnlineTeacher
from hldx.train import Trainer, _optimizer

TWO = "hidden.pairs=[[1,2],[3,5]]"  # tiny student: 4 layers, tiny teacher: 6; the paper's pair is [2, 3]
B, L, K = 2, 16, 8
compose = C.Composer()  # Hydra composes each distinct set of group choices once


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _micro(cfg, layers) -> Micro:
    """A micro-batch of random tokens, top-k and teacher states after each of `layers`."""
    g = torch.Generator().manual_seed(0)
    V, d_t = cfg.student.vocab_size, cfg.teacher.model.hidden_size
    val, idx = torch.randn(B, L, V, generator=g).topk(K, dim=-1)
    return Micro(torch.randint(0, V, (B, L), generator=g), idx, val - val[..., :1],
                 {t: torch.randn(B, L, d_t, generator=g) for t in layers})


def _adapters(cfg, kind: str) -> list[torch.nn.Module]:
    torch.manual_seed(1)
    return [build_regressor(kind, cfg.student.hidden_size, cfg.teacher.model.hidden_size) for _ in hidden.pairs(cfg)]


@pytest.mark.parametrize("method, w", [("hldc", 0.3), ("hldf", 0.8)])
def test_two_pairs_weigh_the_losses_of_each_pair_computed_apart(method, w):
    """The hidden loss of pairs (1, 2) and (3, 5) with weights (w, 1 - w) is w L_12 + (1 - w) L_35, each L computed
    here from HF's own hidden_states, the same adapters and hldx.losses.hidden_loss."""
    cfg = compose([f"method={method}", TWO, f"hidden.weights=[{w},{1 - w}]", "gamma=1"])
    phase = phases(cfg)[0]
    trainer = Trainer(cfg, None, None, None, Path(tempfile.mkdtemp()), None, None)
    model, adapters = build_model(cfg.student, 0), _adapters(cfg, phase.regressor)
    micro = _micro(cfg, [2, 5])
    parts = trainer.loss(phase, trainer.engine(phase, model, adapters), micro)
    states = model(input_ids=micro.tokens_BxL, output_hidden_states=True).hidden_states
    apart = [losses.hidden_loss(adapt(states[s]), micro.hidden[t]) for adapt, (s, t) in zip(adapters, [(1, 2), (3, 5)])]
    name = "loss_emb" if method == "hldc" else "loss_ht"
    torch.testing.assert_close(parts[name], w * apart[0] + (1 - w) * apart[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(parts[f"{name}_s1_t2"], apart[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(parts[f"{name}_s3_t5"], apart[1], rtol=1e-6, atol=0)
    if method == "hldc":  # KD's objective beside it, as KD computes it
        kd, _, _ = losses.kd_objective(model(input_ids=micro.tokens_BxL).logits, micro.tokens_BxL,
                                       micro.topk_idx_BxLxK, micro.topk_val_BxLxK, cfg.tau, cfg.alpha)
        torch.testing.assert_close(parts["loss"], kd + parts["loss_emb"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("pairs, adapter, teacher_width", [("[[1,2],[3,5]]", "linear", 128),
                                                            ("[[0,0],[4,6],[4,3]]", "mlp", 128),
                                                            ("[[2,3],[1,1]]", "identity", 64)])
def test_hldc_with_gamma_zero_steps_as_kd_bitwise_with_any_pairs(pairs, adapter, teacher_width):
    """One Trainer.step (AdamW, clipping) of HLDC at gamma=0 with several pairs (the embedding's output and the
    last layer's among them; identity adapters, for a teacher as wide as the student) leaves the student's
    weights bit for bit where KD's step does."""
    after = {}
    for name, overrides in (("kd", ["method=kd"]),
                            ("hldc", ["method=hldc", "gamma=0", f"hidden.pairs={pairs}", f"hidden.adapter={adapter}"])):
        cfg = compose(overrides + ["train.batch_size=2", f"teacher.model.hidden_size={teacher_width}"])
        phase = phases(cfg)[0]
        trainer = Trainer(cfg, None, None, None, Path(tempfile.mkdtemp()), None, None)
        engine = trainer.engine(phase, build_model(cfg.student, 0), _adapters(cfg, adapter) if phase.regressor else None)
        step = _Step(_micro(cfg, hidden.teacher_layers(cfg)))
        trainer.step(phase, engine, _optimizer(cfg, engine.params, engine.extra, torch.device("cpu")), step)
        after[name] = {k: v.detach().clone() for k, v in engine.net.student_state(engine.net.state_dict()).items()}
    assert after["kd"].keys() == after["hldc"].keys()
    assert all(torch.equal(after["kd"][k], after["hldc"][k]) for k in after["kd"])


class _Step:
    """One step of one micro-batch, as hldx.loader.Step hands it to Trainer.step."""

    def __init__(self, micro: Micro):
        self.m = micro

    def __len__(self) -> int:
        return len(self.m.tokens_BxL)

    def micro(self, start: int, size: int) -> Micro:
        return self.m


def _counting(modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    calls = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_hldf_phase_1_computes_no_layer_above_its_deepest_pair():
    """Pairs (1, 2) and (3, 5) of the 4-layer student: phase 1's step runs its embedding and layers 1..3, never
    layer 4, the final norm or the head, and trains nothing else; an online teacher asked for layers 2 and 5 of
    6 runs no layer above 5 and no head."""
    cfg = compose(["method=hldf", TWO, "train.batch_size=2"])
    phase = phases(cfg)[0]
    model = build_model(cfg.student, 0)
    calls = _counting({f"layer {i + 1}": layer for i, layer in enumerate(model.model.layers)}
                      | {"norm": model.model.norm, "head": model.lm_head, "embedding": model.model.embed_tokens})
    trainer = Trainer(cfg, None, None, None, Path(tempfile.mkdtemp()), None, None)
    engine = trainer.engine(phase, model, _adapters(cfg, phase.regressor))
    trainer.step(phase, engine, _optimizer(cfg, engine.params, engine.extra, torch.device("cpu")),
                 _Step(_micro(cfg, [2, 5])))
    assert calls == {"layer 1": 1, "layer 2": 1, "layer 3": 1, "layer 4": 0, "norm": 0, "head": 0, "embedding": 1}
    trained = {id(p) for p in engine.params}
    assert trained == {id(p) for m in (model.model.embed_tokens, *model.model.layers[:3]) for p in m.parameters()}
    assert all(p.grad is None or not p.grad.any() for p in model.model.layers[3].parameters())

    t = build_model(cfg.teacher.model, 0)
    seen = _counting({f"layer {i + 1}": layer for i, layer in enumerate(t.model.layers)}
                     | {"norm": t.model.norm, "head": t.lm_head})
    _, _, states = OnlineTeacher(cfg, t, torch.device("cpu"))(torch.randint(0, 4096, (B, L)), False, [2, 5])
    assert sorted(states) == [2, 5] and seen["layer 5"] == 1 and seen["layer 6"] == seen["norm"] == seen["head"] == 0
    tokens = torch.randint(0, 4096, (B, L))
    full = t(input_ids=tokens, output_hidden_states=True).hidden_states  # the states HF reports
    _, _, states = OnlineTeacher(cfg, t, torch.device("cpu"))(tokens, False, [0, 2, 5])
    assert all(torch.equal(states[layer], full[layer]) for layer in (0, 2, 5))


def test_the_hidden_path_in_the_run_key_and_run_name():
    key = lambda *o: C.run_key(compose(list(o)))  # noqa: E731
    default = key("method=hldc")
    # The paper's pair, however spelled, and the defaults given explicitly, are the default run.
    assert key("method=hldc", "hidden.pairs=[[2,3]]") == key("method=hldc", "hidden.adapter=linear") == default
    assert key("method=hldc", TWO, "hidden.weights=[0.5,0.5]") == key("method=hldc", TWO) != default
    assert key("method=hldc", "hidden.pairs=[[1,3]]") == key("method=hldc", "hidden.student_layer=1")  # one pair
    assert key("method=hldc", "hidden.pairs=[[1,3]]") != default
    assert key("method=hldc", TWO, "hidden.weights=[0.3,0.7]") != key("method=hldc", TWO)
    assert key("method=hldc", "hidden.adapter=mlp") != default
    # The mlp's width matters to an mlp adapter alone.
    assert key("method=hldc", "method.regressor_expansion=8") == default
    assert key("method=hldf", "hidden.adapter=linear", "method.regressor_expansion=8") == \
        key("method=hldf", "hidden.adapter=linear")
    assert key("method=hldf", "method.regressor_expansion=8") != key("method=hldf")
    # NLL and KD ignore the hidden path.
    for method in ("nll", "kd"):  # nor are they checked there
        assert key(f"method={method}", TWO, "hidden.weights=[0.3,0.7]", "hidden.adapter=mlp") == key(f"method={method}")
        check(compose([f"method={method}", "hidden.pairs=[[9,9]]", "hidden.weights=[2]"]), launch=False)
    assert C.run_name(compose(["method=hldc", TWO, "hidden.weights=[0.3,0.7]", "hidden.adapter=mlp"])) == \
        "hldc|lr=4e-4|tau=1|alpha=0.7|gamma=0.1|pairs=[[1,2],[3,5]]|weights=[0.3,0.7]|adapter=mlp"
    assert C.run_name(compose(["method=hldf", "hidden.pairs=[[2,3]]"])) == "hldf|lr=4e-4|tau=1|alpha=0.7|p1=0.05"


def test_pairs_is_a_sweep_axis():
    """`hidden.pairs=[[2,3]],[[1,2],[3,5]]` expands to two jobs, each composed (hldx.config.Composer) with its list;
    the first is the paper's pair: the default run."""
    jobs = expand_sweep(["method=hldc", "hidden.pairs=[[2,3]],[[1,2],[3,5]]"])
    planned, bad = plan_jobs(jobs)
    assert not bad and len(planned) == 2
    assert [hidden.pairs(c) for _, c, _ in planned] == [[(2, 3)], [(1, 2), (3, 5)]]
    assert planned[0][2].run_key == C.run_key(compose(["method=hldc"]))


def test_flops_count_each_pair_and_the_deeper_phase_1():
    """Each pair's adapter is counted (exact: 6 x its parameters a token; paper: N_reg = 2 d_S d_T each), and phase
    1 up to the deepest paired layer (paper: 6N m_S / D_S, the paper's 3N at the middle); every method spends the
    budget's FLOPs. (Exact against torch's FlopCounterMode: tests/test_plan.py.)"""
    base = ["student=gemma3-123m", "teacher=gemma3-3.4b", "teacher.ckpt=/t", "train.seq_len=512"]
    two = "hidden.pairs=[[9,17],[13,25]]"
    one, both = (flops_per_token(compose(base + ["method=hldc"] + o)) for o in ([], [two]))
    assert both["hldc"] - one["hldc"] == 6 * 640 * 2560  # a second linear W_R
    paper = base + ["budget.accounting=paper"]
    n, n_reg = count_parameters(compose(base).student)["backbone"], 2 * 640 * 2560
    (ht1, hldc1), (ht2, hldc2) = ([flops_per_token(compose(paper + [m] + o))[p] for m, p in (
        ("method=hldf", "ht"), ("method=hldc", "hldc"))] for o in ([], [two]))
    data = flops_per_token(compose(paper + ["method=nll"]))["data"]
    assert ht1 == 3 * n + 6 * n_reg and hldc1 == data + 6 * n_reg  # the paper's A.9
    assert ht2 == pytest.approx(6 * n * 13 / 18 + 2 * 6 * n_reg, rel=1e-15) and hldc2 == data + 2 * 6 * n_reg
    for overrides in ([two, "method=hldc"], [two, "method=hldf"], ["method=hldc", "hidden.adapter=mlp"]):
        run = plan_run(compose(base + ["budget.tokens=1e9"] + overrides))
        step = max(run.flops_per_token[p.name] for p in run.phases) * 512 * 512
        assert abs(run.total_flops - run.budget_flops) <= step * len(run.phases)


# ---- today's runs, as they were -------------------------------------------------------------------------------
# Computed on main before layer pairs existed (2134ddb): a study made then is found finished, its cache reused.

TODAY = {  # name: (overrides, run key, on-demand teacher's key or None, cache digest or None)
    "nll": (["method=nll"], "f44ff2f376b9c61b", None, None),
    "kd": (["method=kd"], "89c75f2ab828a4d6", "6a7086ea4bbd1ea1", "5757dd04bc0ba38e"),
    "hldc": (["method=hldc"], "bd2ca59acf2840d8", "6a7086ea4bbd1ea1", "5757dd04bc0ba38e"),
    "hldf": (["method=hldf"], "94f20db967696c8d", "6a7086ea4bbd1ea1", "5757dd04bc0ba38e"),
    "demo-hldc": (["+sweep=demo", "method=hldc", "lr=3e-3", "alpha=0.5", "seed=1"], "30fe7243ffcaec1b",
                  "4e1ba3406864b274", "5757dd04bc0ba38e"),
    "demo-hldf": (["+sweep=demo", "method=hldf", "lr=3e-3", "alpha=0.9", "seed=0"], "ef88bb83b4965496",
                  "4e1ba3406864b274", "5757dd04bc0ba38e"),
    "demo-kd": (["+sweep=demo", "method=kd", "lr=3e-3", "alpha=0.9", "seed=1"], "f64ec9935e4d3b00",
                "4e1ba3406864b274", "5757dd04bc0ba38e"),
    "paper123-hldc": (["+sweep=paper-123m", "teacher.ckpt=/teachers/3.4b", "method=hldc", "lr=4e-4", "tau=1",
                       "alpha=0.7", "gamma=0.05"], "50be2d9ecd4edb2c", None, "e86fb6a17495dc23"),
    "paper123-hldf": (["+sweep=paper-123m", "teacher.ckpt=/teachers/3.4b", "method=hldf", "lr=1.6e-3", "tau=0.5",
                       "alpha=0.9", "p1=0.01"], "64d08a8fd3727af7", None, "e86fb6a17495dc23"),
    "paper123-kd": (["+sweep=paper-123m", "teacher.ckpt=/teachers/3.4b", "method=kd", "lr=1e-4", "tau=1",
                     "alpha=0.9"], "172dac438172aa9c", None, "e86fb6a17495dc23"),
    "paper735-hldf": (["+sweep=paper-735m", "teacher.ckpt=/teachers/3.4b", "method=hldf", "lr=4e-4", "tau=1",
                       "alpha=0.7", "p1=0.05"], "8156bc419181437f", None, "e86fb6a17495dc23"),
    # One pair off the middle, in the old spelling: its run key stays; its cache is now the shared one (a part
    # hidden-5 beside the middle's), no longer a directory of its own (1fc24732a9a4574e).
    "layers-hldc": (["method=hldc", "hidden.student_layer=1", "hidden.teacher_layer=5"], "58f9d199d1afd14d",
                    "6a7086ea4bbd1ea1", "5757dd04bc0ba38e"),
}
STAGES = [  # a study's first stages by SLURM job name (as the whole grid's: its longest jobs are among these)
    (["+sweep=demo", "seed=0", "alpha=0.5"],
     ["hldx-tokenize-8574dd93db4dec1b", "hldx-teacher-4e1ba3406864b274", "hldx-cache-b60f2ac047db23bb"]),
    (["+sweep=paper-123m", "teacher.ckpt=/teachers/3.4b", "method=kd,hldc,hldf", "lr=4e-4", "tau=1", "alpha=0.7",
      "gamma=0.1", "p1=0.05"], ["hldx-tokenize-6d1cf80d8a2a45f8", "hldx-cache-c71340c3fc375734"]),
]


def test_todays_run_keys_teacher_keys_cache_identities_and_stage_names_are_unchanged(monkeypatch, tmp_path):
    # The cache's identity as hldx composes it; the teacher's and tokenizer's content digests are fixed here.
    monkeypatch.setattr(teacher, "teacher_digest", lambda path: "teacher-digest")
    monkeypatch.setattr(teacher, "tokenizer_digest", lambda tokenizer: "tokenizer-digest")
    rows = Rows(np.zeros((4096, 1), dtype=np.uint16), "rows-digest", Path("/nowhere"))
    for name, (overrides, run, teacher_key, cache) in TODAY.items():
        cfg = compose(overrides)
        assert C.run_key(cfg) == run, name
        assert (C.run_key(teacher.teacher_config(cfg)) if teacher_key else None) == teacher_key, name
        assert (teacher.cache_spec(cfg, None, rows, plan_run(cfg)).digest if cache else None) == cache, name
    for study, names in STAGES:
        planned, bad = plan_jobs(expand_sweep(study + ["paths.cache=/hldx-cache", f"paths.runs={tmp_path}"]))
        assert not bad
        assert [s.job_name for s in stages(planned) if s.name in ("tokenize", "teacher", "cache")] == names, study


def _weights_digest(run_dir: Path) -> str:
    weights = load_file(str(next((run_dir / "final").glob("*.safetensors"))))
    sha = hashlib.sha256()
    for k in sorted(weights):
        sha.update(k.encode())
        sha.update(weights[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, run, weights", [
    (["method=hldc", "gamma=1"], "1ef6b2c0087e8843", "9c0e4446b8437dab"),
    (["method=hldf", "p1=0.3"], "704dfab48f4de7da", "445a586c3955d5bd"),
])
def test_todays_runs_train_to_the_same_weights_bitwise(tiny, overrides, run, weights):
    """Tiny HLDC and HLDF runs with the paper's hidden path end with the weights main gave them before layer pairs
    existed (CPU; the digest of every tensor's bytes). (sr2's bits for the part `hidden`: tests/test_codec.py.)"""
    cfg = compose(tiny + overrides)
    assert C.run_key(cfg) == run
    execute(cfg)
    assert _weights_digest(Path(cfg.paths.runs) / run) == weights


def test_plan_prints_each_part_of_the_cache_and_how_pairs_are_counted(tmp_path, capsys):
    """paper-123m (sr2 hidden states) with one pair and with a second, deeper one: the cache's parts (top-k, teacher
    layers 17 and 25) with their bytes per token, the cache line in its form with B summed over the layers, and the
    paper accounting's extension to pairs stated."""
    out = tmp_path / "plan.json"
    assert plan_main(["-m", "+sweep=paper-123m", "teacher.ckpt=/t", "method=hldc,hldf", "lr=4e-4", "tau=1",
                      "alpha=0.7", "gamma=0.1", "p1=0.05", "hidden.pairs=[[9,17]],[[9,17],[13,25]]",
                      f"plan.json={out}"]) == 0
    text = capsys.readouterr().out
    storage = json.loads(out.read_text())["teacher_cache"]
    sr2 = 2560 / 4 + 2560 / 32 + 16 / 512
    assert [(name, p["layer"], p["bytes_per_token"]) for name, p in storage["parts"].items()] == [
        ("topk", None, 512 + 16 / 512), ("hidden", 17, sr2), ("hidden-25", 25, sr2)]
    assert storage["hidden_bytes_per_token"] == 2 * sr2
    assert storage["bytes"] == pytest.approx(sum(p["bytes"] for p in storage["parts"].values()), abs=4)
    assert "teacher cache parts (bytes per token with checksums x tokens of the longest job reading it): topk " \
           "512.031 B x " in text and "| hidden (teacher layer 17) 720.031 B x " in text
    assert "| hidden-25 (teacher layer 25) 720.031 B x " in text
    line = next(x for x in text.splitlines() if x.startswith("teacher cache (bfloat16 top-k, sr2 hidden states): "))
    assert re.fullmatch(r"teacher cache \(bfloat16 top-k, sr2 hidden states\): top-k for \S+ tokens x 512.031 B \+ "
                        r"hidden states for \S+ tokens x 1440.06 B = \S+ TB on disk", line), line
    assert "hidden path (budget.accounting=paper, extended to layer pairs): N_reg = 2 d_S d_T per pair" in text
