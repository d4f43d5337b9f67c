"""HLD's hidden path as configured: which student layer learns which teacher layer (`hidden.pairs`), what each pair
weighs (`hidden.weights`) and what maps the student's width to the teacher's (`hidden.adapter`); checked,
resolved, and named in a run's identity.

A layer is an index into HF's hidden_states: 0 is the embedding output, l the residual stream after decoder layer
l (at l = D before the final norm: HF's last entry is after it). `hidden.student_layer` / `hidden.teacher_layer`
spell one pair (null: the middle, D // 2), as before pairs existed; `hidden.pairs` spells any number of them.
The hidden loss is the weighted sum of one loss per pair (weights summing to 1, so gamma keeps its meaning).
"""
from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from hldx.errors import ConfigError, check as require

HLD = ("hldc", "hldf")
DEFAULT_ADAPTER = {"hldc": "linear", "hldf": "mlp"}   # the paper's: W_R for HLDC, the MLP (x4) for HLDF
WEIGHT_SUM_TOL = 1e-6


def pairs(cfg: DictConfig) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs, in the order given."""
    h = cfg.hidden
    if h.pairs is not None:
        return [(int(s), int(t)) for s, t in h.pairs]
    m_s, m_t = middle(cfg)
    return [(m_s if h.student_layer is None else int(h.student_layer),
             m_t if h.teacher_layer is None else int(h.teacher_layer))]


def weights(cfg: DictConfig) -> list[float]:
    """Each pair's weight in the hidden loss: hidden.weights, or equal ones."""
    n = len(pairs(cfg))
    return [float(w) for w in cfg.hidden.weights] if cfg.hidden.weights is not None else [1.0 / n] * n


def adapter(cfg: DictConfig) -> str:
    """linear, mlp or identity: hidden.adapter, or the method's (the paper's)."""
    return cfg.hidden.adapter or DEFAULT_ADAPTER[cfg.method.name]


def teacher_layers(cfg: DictConfig) -> list[int]:
    """The distinct teacher layers the pairs read, in increasing order."""
    return sorted({t for _, t in pairs(cfg)})


def middle(cfg: DictConfig) -> tuple[int, int]:
    """The paper's pair: the middle (D // 2) of each network."""
    return cfg.student.num_hidden_layers // 2, cfg.teacher.model.num_hidden_layers // 2


def deepest(cfg: DictConfig) -> int:
    """The deepest paired student layer: HLDF's phase 1 trains and computes the student up to it."""
    return max(s for s, _ in pairs(cfg))


def _text(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def check(cfg: DictConfig) -> None:
    """The hidden path of an HLD job against the student and the teacher (the schema checked each key's type)."""
    if cfg.method.name not in HLD:
        return
    h, d_s, d_t = cfg.hidden, cfg.student.num_hidden_layers, cfg.teacher.model.num_hidden_layers
    if h.pairs is None:
        for key, layer, depth in (("student_layer", h.student_layer, d_s), ("teacher_layer", h.teacher_layer, d_t)):
            require(layer is None or layer <= depth, f"hidden.{key}", layer,
                    f"null (the middle) or a layer in 1..{depth}")
    else:
        given = _text(OmegaConf.to_container(h.pairs))
        if h.student_layer is not None or h.teacher_layer is not None:
            raise ConfigError(f"hidden.pairs={given} is invalid: give the layers either as hidden.pairs or as "
                              f"hidden.student_layer/hidden.teacher_layer (one pair), not both")
        given_pairs = pairs(cfg)
        for s, t in given_pairs:
            require(s <= d_s and t <= d_t, "hidden.pairs", given,
                    f"[student_layer, teacher_layer] pairs of the student's layers 0..{d_s} and the teacher's "
                    f"0..{d_t} (0: the embedding output); [{s}, {t}] is not one")
        twice = next((list(p) for i, p in enumerate(given_pairs) if p in given_pairs[:i]), None)
        require(twice is None, "hidden.pairs", given, f"distinct pairs ({_text(twice)} is given twice)")
    if h.weights is not None:
        n, w = len(pairs(cfg)), weights(cfg)
        require(len(w) == n and abs(sum(w) - 1) <= WEIGHT_SUM_TOL, "hidden.weights",
                _text(OmegaConf.to_container(h.weights)),
                f"one weight > 0 per pair of hidden.pairs ({n}), summing to 1")
    width_s, width_t = cfg.student.hidden_size, cfg.teacher.model.hidden_size
    require(adapter(cfg) != "identity" or width_s == width_t, "hidden.adapter", "identity",
            f"linear or mlp: identity needs the student's width to be the teacher's (student.hidden_size={width_s}, "
            f"teacher.model.hidden_size={width_t})")


def identity(cfg: DictConfig) -> dict:
    """The hidden path's part of an HLD run's key, as runs made before pairs existed have it. One pair is written
    as the key has always written it, student_layer / teacher_layer (given through hidden.pairs, a middle layer as
    null: `hidden.pairs=[[D/2, D_T/2]]` is the default run); weights and adapter only where they are not the
    defaults (equal, the method's)."""
    h = cfg.hidden
    ident = {"student_layer": h.student_layer, "teacher_layer": h.teacher_layer, "loss": h.loss}
    if h.pairs is not None:
        given = pairs(cfg)
        if len(given) == 1:
            (s, t), (m_s, m_t) = given[0], middle(cfg)
            ident["student_layer"], ident["teacher_layer"] = None if s == m_s else s, None if t == m_t else t
        else:
            ident = {"pairs": [list(p) for p in given], "loss": h.loss}
    w = weights(cfg)
    if any(x != w[0] for x in w):
        ident["weights"] = w
    if adapter(cfg) != DEFAULT_ADAPTER[cfg.method.name]:
        ident["adapter"] = adapter(cfg)
    return ident


def variant(cfg: DictConfig) -> str:
    """The hidden path as a run's variant text beside gamma= or p1= (run names, the analysis): "" for the paper's,
    else e.g. pairs=[[1,2],[3,5]]|weights=[0.3,0.7]|adapter=mlp (the parts that are not the defaults)."""
    if cfg.method.name not in HLD:
        return ""
    ident, given = identity(cfg), pairs(cfg)
    parts = [f"pairs={_text([list(p) for p in given])}"] if given != [middle(cfg)] else []
    parts += [f"weights={_text(ident['weights'])}"] if "weights" in ident else []
    parts += [f"adapter={ident['adapter']}"] if "adapter" in ident else []
    return "|".join(parts)
