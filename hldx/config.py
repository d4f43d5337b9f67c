"""Composing, checking and identifying configs.

`compose` builds a config from `conf/` (typed by `hldx.schema`), `check` runs the schema's rules and the
checks that tie keys to each other, and `identity` / `run_key` name what determines a run's result. The
subsystems check their own keys (data.check, teacher.check, ...); `hldx.job.check` runs every check.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hldx import hidden, schema
from hldx.cli import explain
from hldx.errors import ConfigError, check as require

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
METHODS = ("nll", "kd", "hldc", "hldf")
DISTILLED = schema.DISTILLED
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
                      "loss_chunk", "parallel")
RUNTIME_DATA_KEYS = ("max_epochs", "train_tokens", "workers", "tasks")  # how data is read or made, not what it is

schema.register()


def compose(overrides: list[str] | None = None, config_name: str = "config", with_hydra: bool = False) -> DictConfig:
    """Compose `conf/` with Hydra outside a Hydra app (plan, tests, sweep expansion); `with_hydra` keeps the
    `hydra` node (e.g. a sweep config's hydra.sweeper.params). A bad override raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name, overrides=list(overrides or []), return_hydra_config=with_hydra)
    except Exception as err:  # noqa: BLE001 - a user's mistake becomes a ConfigError, a bug stays as it is
        if (line := explain(err)) is None:
            raise
        raise ConfigError(line) from None


class Composer:
    """Composes the jobs of a sweep fast: Hydra composes each distinct set of group choices once (about a
    second each), then plain `key=value` overrides are applied to a copy, as Hydra itself applies them."""

    def __init__(self):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.parser, self.bases = OverridesParser.create(), {}

    def __call__(self, job: list[str]) -> DictConfig:
        try:
            parsed = self.parser.parse_overrides(job)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(explain(err) or str(err)) from None
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
                raise ConfigError(f"{o.input_line} is invalid: there is no such key{f' in {parent}' if parent else ''}"
                                  f" (python -m hldx.run --help lists the keys; +{o.input_line} adds a new one)")
            try:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
            except Exception as err:  # noqa: BLE001 - a value of the wrong type, as Hydra would report it
                if (line := explain(err)) is None:
                    raise
                raise ConfigError(line.replace(f"={getattr(err, 'value', '')} ", f"={o.value()} ", 1)) from None
        return cfg


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key outside its schema's rule, or keys that contradict each other."""
    _check_rules(cfg, cfg, "", cfg.method.name)
    method = cfg.method.name
    if method == "hldf" and cfg.p1 == 0:
        raise ConfigError("p1=0 gives HLDF no phase 1, which is plain KD: use method=kd instead")
    if method in DISTILLED:
        require(cfg.method.top_k <= cfg.student.vocab_size, "method.top_k", cfg.method.top_k,
                f"at most the vocabulary size {cfg.student.vocab_size}")
        if cfg.teacher.model.vocab_size != cfg.student.vocab_size:
            raise ConfigError(
                f"teacher and student must share a tokenizer: teacher.model.vocab_size="
                f"{cfg.teacher.model.vocab_size} but student.vocab_size={cfg.student.vocab_size}")
    b = cfg.budget
    require(any(b[k] is not None for k in ("flops", "ot", "tokens")), "budget", "none set",
            "one of budget.flops=F, budget.ot=K or budget.tokens=T")
    t = cfg.train
    models = [("student", cfg.student)] + ([("teacher.model", cfg.teacher.model)] if method in DISTILLED else [])
    for name, m in models:
        require(t.seq_len <= m.max_position_embeddings, "train.seq_len", t.seq_len,
                f"at most {name}.max_position_embeddings = {m.max_position_embeddings}")
    if t.micro_batch_size is not None:
        require(t.batch_size % t.micro_batch_size == 0, "train.micro_batch_size", t.micro_batch_size,
                f"a divisor of train.batch_size={t.batch_size}")
    require(cfg.data.vocab_size == cfg.student.vocab_size, "data.vocab_size", cfg.data.vocab_size,
            f"the student's vocabulary size {cfg.student.vocab_size}")
    hidden.check(cfg)


def _check_rules(root: DictConfig, node: DictConfig, prefix: str, method: str) -> None:
    """Walk the node's schema: every field's value against its rule (keys the method ignores are skipped)."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return
    for f in dataclasses.fields(kind):
        path = f"{prefix}{f.name}"
        if OmegaConf.is_missing(node, f.name):
            if not f.metadata.get("missing_ok"):
                raise ConfigError(f"{path} is not set: give it a value ({path}=VALUE)")
            continue
        value = node[f.name]
        if isinstance(value, DictConfig):
            _check_rules(root, value, f"{path}.", method)
            continue
        used_by, rule = f.metadata.get("used_by"), f.metadata.get("rule")
        if used_by is not None and method not in used_by:
            continue
        if value is None:
            require(f.metadata.get("null", False), path, "null", rule.allowed if rule else "a value")
        elif rule is not None:
            plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            require(rule.ok(plain), path, _shown(plain), rule.allowed + (" or null" if f.metadata.get("null") else ""))


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


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
        "data": {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                 if k not in RUNTIME_DATA_KEYS},
        "budget": OmegaConf.to_container(cfg.budget, resolve=True),
        "train": train,
        "seed": int(cfg.seed),
        **{k: v for k, v in hparams(cfg).items() if v is not None},
    }
    if method in DISTILLED:
        # teacher.source is part of it: an online teacher's forward is charged to the FLOPs budget
        ident["teacher"] = OmegaConf.to_container(cfg.teacher, resolve=True)
        if cfg.teacher.source == "cache":  # what the cache rounds the teacher's outputs to
            ident["cache"] = {k: cfg.cache[k] for k in ("values_dtype", "hidden_dtype")[:1 if method == "kd" else 2]}
            if variant := logits_variant(cfg):  # ids drawn from the teacher's distribution at the taus, not its top-k
                ident["cache"] |= variant
                ident["method"].pop("top_k")
    if method in hidden.HLD:
        ident["hidden"] = hidden.identity(cfg)
        if hidden.adapter(cfg) != "mlp":  # the mlp adapter's width, nothing to another adapter
            ident["method"].pop("regressor_expansion", None)
    return ident


def logits_variant(cfg: DictConfig) -> dict:
    """What a distilled run reads of the teacher's logits where it is not the paper's top-k from the cache: {} for
    top-k (or an online teacher), else cache.logits, draws and taus (sampled logits)."""
    c = cfg.cache
    if cfg.method.name not in DISTILLED or cfg.teacher.source != "cache" or c.logits == "topk":
        return {}
    return {"logits": c.logits, "draws": int(c.draws), "taus": sorted(float(t) for t in c.taus)}


@functools.cache
def preset(group: str, name: str, node: type) -> DictConfig:
    """conf/<group>/<name>.yaml over its schema `node`, as Hydra composes it, without Hydra: this runs inside a
    Hydra job, whose global state a compose would reset."""
    body = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    return OmegaConf.merge(OmegaConf.structured(node), {k: v for k, v in body.items() if k != "defaults"})


def as_kd(cfg: DictConfig, tau: float | None = None, alpha: float | None = None) -> DictConfig:
    """cfg's run as KD (at its own tau and alpha unless given): the partner it is compared with."""
    kd = cfg.copy()
    kd.method = preset("method", "kd", schema.KD).copy()
    kd.tau, kd.alpha = cfg.tau if tau is None else tau, cfg.alpha if alpha is None else alpha
    return kd


def kd_partner_key(cfg: DictConfig, tau: float, alpha: float) -> str:
    """The run_key of the KD run that cfg's run is compared with at (tau, alpha) (an HLD run's own point; an
    NLL run has one partner per KD point at its lr)."""
    return run_key(as_kd(cfg, tau, alpha))


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


def logits_text(cfg: DictConfig) -> str:
    """The teacher's logits as a run's variant text (run names, the analysis): "" for the paper's top-k, else e.g.
    logits=sampled(12,[0.5,1,2]) (cache.logits, draws, taus)."""
    v = logits_variant(cfg)
    return f"logits={v['logits']}({v['draws']},[{','.join(f'{t:g}' for t in v['taus'])}])" if v else ""


def run_name(cfg: DictConfig) -> str:
    """Readable MLflow run name, e.g. hldf|lr=4e-4|tau=1|alpha=0.7|p1=0.05 (then the hidden path where it is not
    the paper's, e.g. |pairs=[[1,2],[3,5]], the logits where they are not top-k, e.g. |logits=sampled(12,[0.5,1,2]),
    and |seed=S for a seed other than 0)."""
    hp = hparams(cfg)
    path = [variant] if (variant := hidden.variant(cfg)) else []
    path += [variant] if (variant := logits_text(cfg)) else []
    seed = [f"seed={cfg.seed}"] if cfg.seed else []
    return "|".join([cfg.method.name] + [f"{k}={short(v)}" for k, v in hp.items() if v is not None] + path + seed)
