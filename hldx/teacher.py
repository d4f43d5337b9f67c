"""The teacher: loaded from `teacher.ckpt`, or (tiny default) pre-trained once on demand by hldx itself."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from hldx import config as C
from hldx.models import forward, forward_to_layer, load_model, middle_layer

log = logging.getLogger(__name__)


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The NLL run that pre-trains the configured teacher on the same data and tokenizer."""
    if cfg.teacher.build is None:
        raise C.ConfigError(f"teacher={cfg.teacher.model.name} has no on-demand recipe: set teacher.ckpt=DIR "
                            f"(pre-train it with: python -m hldx.run method=nll student={cfg.teacher.model.name})")
    tcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    tcfg.method = {"name": "nll"}
    tcfg.student = OmegaConf.to_container(cfg.teacher.model, resolve=True)
    tcfg.lr = cfg.teacher.build.lr
    tcfg.budget = {"flops": None, "ot": None, "tokens": cfg.teacher.build.tokens, "accounting": "exact"}
    tcfg.data.vocab_size = cfg.student.vocab_size
    return tcfg


def teacher_path(cfg: DictConfig) -> Path:
    """Where the teacher's HF checkpoint is: teacher.ckpt, or the content-addressed on-demand build."""
    if cfg.teacher.ckpt:
        return Path(cfg.teacher.ckpt).expanduser()
    return Path(cfg.paths.cache).expanduser() / "teachers" / C.run_key(teacher_config(cfg)) / "final"


def load_teacher(cfg: DictConfig) -> torch.nn.Module:
    """The frozen teacher, checked against the configured shape (vocabulary, hidden size)."""
    path = teacher_path(cfg)
    if not (path / "config.json").exists():
        raise C.ConfigError(f"teacher.ckpt={path} holds no checkpoint (config.json missing)")
    model = load_model(str(path))
    got, want = model.config, cfg.teacher.model
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(got, key) != want[key]:
            raise C.ConfigError(f"the teacher at {path} has {key}={getattr(got, key)} but teacher.model.{key}="
                                f"{want[key]}: pick the matching teacher preset or override teacher.model.{key}")
    return model.eval().requires_grad_(False)


class OnlineTeacher:
    """Runs the teacher's forward for each batch: top-k logits and/or its mid-layer hidden state."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, device: torch.device):
        self.model, self.k = model.to(device), cfg.method.get("top_k", 128)
        self.layer = middle_layer(cfg.teacher.model.num_hidden_layers, cfg.hidden.teacher_layer)

    @torch.no_grad()
    def __call__(self, rows: Tensor, tokens_BxL: Tensor, logits: bool, hidden: bool):
        if not logits:
            return None, None, forward_to_layer(self.model, tokens_BxL, self.layer).float()
        logits_BxLxV, hidden_BxLxD = forward(self.model, tokens_BxL, self.layer if hidden else None)
        topk_val_BxLxK, topk_idx_BxLxK = logits_BxLxV.float().topk(self.k, dim=-1)
        return topk_idx_BxLxK, topk_val_BxLxK, None if hidden_BxLxD is None else hidden_BxLxD.float()
