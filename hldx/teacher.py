"""The teacher: loaded from `teacher.ckpt`, or (tiny default) pre-trained once on demand by hldx itself; its
outputs read online or from the teacher cache it builds (hldx.store)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from hldx import config as C
from hldx import schema
from hldx.data import tokenizer_digest
from hldx.errors import ConfigError, check as require
from hldx.models import forward, forward_to_layer, load_model, middle_layer
from hldx.store import DTYPES, CacheSpec, build, open_cache, resolve_dir, resolve_hidden_rows

log = logging.getLogger(__name__)


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The NLL run that pre-trains the configured teacher on the same data and tokenizer."""
    if cfg.teacher.build is None:
        raise ConfigError(f"teacher={cfg.teacher.model.name} has no on-demand recipe: set teacher.ckpt=DIR "
                          f"(pre-train it with: python -m hldx.run method=nll student={cfg.teacher.model.name})")
    tcfg = cfg.copy()
    tcfg.method = OmegaConf.structured(schema.NLL(name="nll"))
    tcfg.student = cfg.teacher.model
    tcfg.lr = cfg.teacher.build.lr
    tcfg.budget = schema.Budget(flops=None, ot=None, tokens=cfg.teacher.build.tokens, accounting="exact")
    tcfg.data.vocab_size = cfg.student.vocab_size
    return tcfg


def teacher_path(cfg: DictConfig) -> Path:
    """Where the teacher's HF checkpoint is: teacher.ckpt, or the content-addressed on-demand build."""
    if cfg.teacher.ckpt:
        return Path(cfg.teacher.ckpt).expanduser()
    return Path(cfg.paths.cache).expanduser() / "teachers" / C.run_key(teacher_config(cfg)) / "final"


def check(cfg: DictConfig, launch: bool = True) -> None:
    """teacher.* and cache.* of a distilled job (an NLL job has no teacher); `launch`: also that the teacher
    exists, or can be pre-trained on demand."""
    if cfg.method.name not in C.DISTILLED:
        return
    c = cfg.cache
    for key in ("values_dtype", "hidden_dtype"):
        require(c[key] in DTYPES, f"cache.{key}", c[key], f"one of {', '.join(DTYPES)}")
    require(c.task < c.tasks, "cache.task", c.task, f"a worker index in [0, cache.tasks={c.tasks})")
    if cfg.hidden.teacher_layer is not None:
        depth = cfg.teacher.model.num_hidden_layers
        require(cfg.hidden.teacher_layer <= depth, "hidden.teacher_layer", cfg.hidden.teacher_layer,
                f"null (the middle) or a layer in 1..{depth}")
    if not launch:
        return
    if OmegaConf.is_missing(cfg.teacher, "ckpt"):
        raise ConfigError(f"teacher.ckpt is not set: pass teacher.ckpt=DIR (the teacher, pre-trained with "
                          f"python -m hldx.run method=nll student={cfg.teacher.model.name})")
    if cfg.teacher.ckpt:
        if not (Path(cfg.teacher.ckpt).expanduser() / "config.json").exists():
            raise ConfigError(f"teacher.ckpt={cfg.teacher.ckpt} holds no checkpoint (config.json missing): point "
                              f"it at the teacher's saved model directory")
    else:
        teacher_config(cfg)  # an on-demand teacher needs its recipe


def load_teacher(cfg: DictConfig) -> torch.nn.Module:
    """The frozen teacher, checked against the configured shape (vocabulary, hidden size)."""
    path = teacher_path(cfg)
    if not (path / "config.json").exists():
        raise ConfigError(f"teacher.ckpt={path} holds no checkpoint (config.json missing): point it at the "
                          f"teacher's saved model directory")
    model = load_model(str(path))
    got, want = model.config, cfg.teacher.model
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(got, key) != want[key]:
            raise ConfigError(f"the teacher at {path} has {key}={getattr(got, key)} but teacher.model.{key}="
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


def teacher_digest(path: Path) -> str:
    """Content hash of a teacher checkpoint: its config and weight files."""
    sha = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def cache_spec(cfg: DictConfig, tokenizer, stream) -> CacheSpec:
    """The cache every method of a sweep shares: all rows of the stream, hidden states per cache.hidden_rows."""
    rows = stream.rows(cfg.train.seq_len)
    return CacheSpec(
        teacher_digest=teacher_digest(teacher_path(cfg)), tokenizer_digest=tokenizer_digest(tokenizer),
        stream_digest=stream.digest, seq_len=cfg.train.seq_len, rows=rows, k=cfg.method.get("top_k", 128),
        vocab_size=cfg.student.vocab_size,
        hidden_layer=middle_layer(cfg.teacher.model.num_hidden_layers, cfg.hidden.teacher_layer),
        hidden_size=cfg.teacher.model.hidden_size, hidden_rows=resolve_hidden_rows(cfg.cache.hidden_rows, rows),
        values_dtype=cfg.cache.values_dtype, hidden_dtype=cfg.cache.hidden_dtype,
        rows_per_shard=cfg.cache.rows_per_shard)


def build_cache(cfg: DictConfig, spec: CacheSpec, stream, device: torch.device, rows: range | None = None) -> Path:
    """Build (or finish, or check) the teacher cache `spec` of cfg; returns its directory. The teacher is
    loaded only if a shard is missing."""
    root = resolve_dir(cfg.cache.dir, Path(cfg.paths.cache).expanduser(), spec)
    tokens_RxL = stream.tokens[: spec.rows * spec.seq_len].reshape(spec.rows, spec.seq_len)
    online: list[OnlineTeacher] = []

    def teacher_fn(tokens_BxL: Tensor):
        if not online:
            online.append(OnlineTeacher(cfg, load_teacher(cfg), device))
        idx, val, hidden = online[0](None, tokens_BxL.to(device), True, spec.hidden_rows > 0)
        return idx.cpu(), val.cpu(), None if hidden is None else hidden.cpu()

    build(spec, root, teacher_fn, lambda r: torch.from_numpy(tokens_RxL[r].astype(np.int64)), rows,
          batch_rows=cfg.cache.batch_rows)
    return root


class CachedTeacher:
    """Teacher outputs read from the shared cache by row index (built on first use, file-locked)."""

    def __init__(self, cfg: DictConfig, tokenizer, stream, device: torch.device):
        spec = cache_spec(cfg, tokenizer, stream)
        root = build_cache(cfg, spec, stream, device)
        if cfg.method.name == "kd":  # a KD run needs no hidden state: any cache with the top-k will do
            spec = dataclasses.replace(spec, hidden_layer=None, hidden_size=0, hidden_rows=0)
        self.reader, self.device = open_cache(root, spec, prefetch=cfg.cache.prefetch), device

    def __call__(self, rows: Tensor, tokens_BxL: Tensor, logits: bool, hidden: bool):
        idx, val, hid = self.reader.get(rows.numpy(), topk=logits, hidden=hidden)
        return tuple(None if t is None else t.to(self.device, non_blocking=True) for t in (idx, val, hid))


def teacher_source(cfg: DictConfig, tokenizer, stream, device: torch.device):
    """The teacher a distilled run reads: the cache (teacher.source=cache) or the live model (online)."""
    if cfg.teacher.source == "cache":
        return CachedTeacher(cfg, tokenizer, stream, device)
    return OnlineTeacher(cfg, load_teacher(cfg), device)
