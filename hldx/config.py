"""Composing, validating and identifying configs: the checks every entry point runs before any work."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
METHODS = ("nll", "kd", "hldc", "hldf")
DISTILLED = ("kd", "hldc", "hldf")
# Which shared hyperparameters each method uses; the others are not part of its identity.
USES = {
    "nll": ("lr",),
    "kd": ("lr", "tau", "alpha"),
    "hldc": ("lr", "tau", "alpha", "gamma"),
    "hldf": ("lr", "tau", "alpha", "p1"),
}
HPARAMS = ("lr", "tau", "alpha", "gamma", "p1")
# Keys that change how a run executes, not what it computes: left out of the run identity.
RUNTIME_TRAIN_KEYS = ("micro_batch_size", "ckpt_every", "log_every", "device", "precision", "compile",
                      "loss_chunk")


class ConfigError(ValueError):
    """A bad setting: the message names the key, what was given and what is allowed."""


def compose(overrides: list[str] | None = None, config_name: str = "config", with_hydra: bool = False) -> DictConfig:
    """Compose `conf/` with Hydra outside a Hydra app (plan, tests, sweep expansion); `with_hydra` keeps the
    `hydra` node (e.g. a sweep config's hydra.sweeper.params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name, overrides=list(overrides or []), return_hydra_config=with_hydra)


class Composer:
    """Composes the jobs of a sweep fast: Hydra composes each distinct set of group choices once (about a
    second each), then plain `key=value` overrides are applied to a copy, as Hydra itself applies them."""

    def __init__(self):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.parser, self.bases = OverridesParser.create(), {}

    def __call__(self, job: list[str]) -> DictConfig:
        parsed = self.parser.parse_overrides(job)
        simple = [o for o in parsed if o.type.name == "CHANGE" and not (CONF_DIR / o.key_or_group).is_dir()
                  and not o.key_or_group.startswith("hydra")]
        rest = tuple(o.input_line for o in parsed if o not in simple)
        if rest not in self.bases:
            self.bases[rest] = compose(list(rest))
        cfg = self.bases[rest].copy()
        for o in simple:
            parent, _, leaf = o.key_or_group.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or leaf not in node.keys():
                raise ConfigError(f"could not override '{o.key_or_group}': no such key in the config "
                                  f"(to add one, use +{o.input_line})")
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
        return cfg


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad setting, before any training."""
    method = cfg.method.name
    _check(method in METHODS, "method", method, f"one of {', '.join(METHODS)}")
    _check(cfg.lr is not None and cfg.lr > 0, "lr", cfg.lr, "a number > 0")
    if method in DISTILLED:
        _check(cfg.tau is not None and cfg.tau > 0, "tau", cfg.tau, "a number > 0")
        _check(cfg.alpha is not None and 0 <= cfg.alpha <= 1, "alpha", cfg.alpha, "a number in [0, 1]")
        _check(cfg.method.top_k >= 1, "method.top_k", cfg.method.top_k, "an integer >= 1")
        _check(cfg.method.top_k <= cfg.student.vocab_size, "method.top_k", cfg.method.top_k,
               f"at most the vocabulary size {cfg.student.vocab_size}")
    if method == "hldc":
        _check(cfg.gamma is not None and cfg.gamma >= 0, "gamma", cfg.gamma, "a number >= 0")
    if method == "hldf":
        _check(cfg.p1 is not None and 0 <= cfg.p1 < 1, "p1", cfg.p1, "a number in [0, 1)")
        if cfg.p1 == 0:
            raise ConfigError("p1=0 gives HLDF no phase 1, which is plain KD: use method=kd instead")
    b = cfg.budget
    _check(any(b[k] is not None for k in ("flops", "ot", "tokens")), "budget", "none set",
           "one of budget.flops=F, budget.ot=K or budget.tokens=T")
    for key in ("flops", "ot", "tokens"):
        _check(b[key] is None or b[key] > 0, f"budget.{key}", b[key], "a number > 0")
    _check(b.accounting in ("exact", "paper"), "budget.accounting", b.accounting, "exact or paper")
    from hldx.evaluate import check as check_eval

    check_eval(cfg)
    t = cfg.train
    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "an integer >= 2")
    models = [("student", cfg.student)] + ([("teacher.model", cfg.teacher.model)] if method in DISTILLED else [])
    for name, m in models:
        _check(t.seq_len <= m.max_position_embeddings, "train.seq_len", t.seq_len,
               f"at most {name}.max_position_embeddings = {m.max_position_embeddings}")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    if method in DISTILLED and cfg.teacher.model.vocab_size != cfg.student.vocab_size:
        raise ConfigError(
            f"teacher and student must share a tokenizer: teacher.model.vocab_size="
            f"{cfg.teacher.model.vocab_size} but student.vocab_size={cfg.student.vocab_size}")
    _check(cfg.data.vocab_size == cfg.student.vocab_size, "data.vocab_size", cfg.data.vocab_size,
           f"the student's vocabulary size {cfg.student.vocab_size}")
    if cfg.data.path is not None:
        path = Path(cfg.data.path).expanduser()
        hub_id = cfg.data.name == "c4" and not path.exists() and not cfg.data.path.startswith(("/", ".", "~"))
        if not hub_id:
            _check(path.is_dir() and os.access(path, os.R_OK), "data.path", cfg.data.path,
                   "a readable directory of corpus files")


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} is invalid: expected {allowed}")


def warn_unused(cfg: DictConfig, overrides: list[str]) -> None:
    """Warn once for a hyperparameter given explicitly that the method ignores."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    ignored = [k for k in HPARAMS if k in given and k not in USES[cfg.method.name]]
    if ignored:
        log.warning("method=%s ignores %s: %s has no effect on this run",
                    cfg.method.name, ", ".join(ignored), " and ".join(f"{k}={cfg[k]}" for k in ignored))


def hparams(cfg: DictConfig) -> dict[str, float | None]:
    """The shared hyperparameters, None where the method does not use them."""
    used = USES[cfg.method.name]
    return {k: (float(cfg[k]) if k in used else None) for k in HPARAMS}


def identity(cfg: DictConfig) -> dict:
    """Everything that determines a run's result, canonicalised (unused keys dropped)."""
    method = cfg.method.name
    train = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
             if k not in RUNTIME_TRAIN_KEYS}
    ident = {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "student": OmegaConf.to_container(cfg.student, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "budget": OmegaConf.to_container(cfg.budget, resolve=True),
        "train": train,
        "seed": int(cfg.seed),
        **{k: v for k, v in hparams(cfg).items() if v is not None},
    }
    if method in DISTILLED:
        # teacher.source is part of it: an online teacher's forward is charged to the FLOPs budget
        ident["teacher"] = OmegaConf.to_container(cfg.teacher, resolve=True)
    if method in ("hldc", "hldf"):
        ident["hidden"] = OmegaConf.to_container(cfg.hidden, resolve=True)
    return ident


def digest(obj) -> str:
    """A short content hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(cfg: DictConfig) -> str:
    return digest(identity(cfg))


def short(x: float) -> str:
    """Compact number text for run names and keys: 0.0004 -> 4e-4, 1.0 -> 1, 0.05 -> 0.05."""
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
        mantissa, exp = f"{x:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:g}"


def hp_key(cfg: DictConfig) -> str:
    """The shared (lr, tau, alpha) point that pairs runs of different methods."""
    hp = hparams(cfg)
    return "|".join(f"{k}={short(hp[k])}" for k in ("lr", "tau", "alpha") if hp[k] is not None)


def run_name(cfg: DictConfig) -> str:
    """Readable MLflow run name, e.g. hldf|lr=4e-4|tau=1|alpha=0.7|p1=0.05."""
    hp = hparams(cfg)
    return "|".join([cfg.method.name] + [f"{k}={short(v)}" for k, v in hp.items() if v is not None])
