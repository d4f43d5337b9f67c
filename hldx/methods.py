"""A method is a list of phases; a phase names its loss, its share of the FLOPs budget and its schedule."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from hldx import hidden


@dataclass(frozen=True)
class Phase:
    name: str          # nll | kd | hldc | ht: the loss of the phase (and its FLOPs-per-token entry)
    fraction: float    # share of the run's FLOPs budget
    schedule: str      # cosine: warm-up then cosine decay; constant: warm-up then the peak lr
    regressor: str | None = None   # the adapter of each layer pair (hldx.hidden), dropped after the phase

    @property
    def needs_teacher_logits(self) -> bool:
        return self.name in ("kd", "hldc")

    @property
    def needs_teacher_hidden(self) -> bool:
        return self.name in ("hldc", "ht")


def phases(cfg: DictConfig) -> list[Phase]:
    """The phases of cfg.method: HLDF is hint training on the fraction p1 of the budget, then KD."""
    name = cfg.method.name
    if name == "hldf":
        return [Phase("ht", cfg.p1, "constant", hidden.adapter(cfg)), Phase("kd", 1.0 - cfg.p1, "cosine")]
    if name == "hldc":
        return [Phase("hldc", 1.0, "cosine", hidden.adapter(cfg))]
    return [Phase(name, 1.0, "cosine")]
