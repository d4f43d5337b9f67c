"""The teacher: loaded from `teacher.ckpt`, or (tiny default) pre-trained once on demand by hldx itself; its
outputs read online or from the teacher cache it builds (hldx.store)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from hldx import config as C
from hldx import data, schema
from hldx.data import tokenizer_digest
from hldx.errors import ConfigError, check as require
from hldx.models import final_state, hidden_states, load_model
from hldx.budget import RunPlan, cache_parts, shape_spec
from hldx.order import Rows
from hldx.store import (HIDDEN_DTYPES, VALUE_DTYPES, CacheReader, CacheSpec, build, codec, hidden_part, open_cache,
                        part_kind, part_layer)

log = logging.getLogger(__name__)


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The NLL run that pre-trains the configured teacher. Its identity is the teacher's alone: its model, the
    data and tokenizer, and its recipe teacher.build.* (tokens, lr, seed, the train preset); nothing of the
    student's job but how it runs (device, precision, compile: keys outside every run's identity)."""
    if cfg.teacher.build is None:
        raise ConfigError(f"teacher={cfg.teacher.model.name} has no on-demand recipe: set teacher.ckpt=DIR "
                          f"(pre-train it with: python -m hldx.run method=nll student={cfg.teacher.model.name})")
    build = cfg.teacher.build
    tcfg = cfg.copy()
    tcfg.method = OmegaConf.structured(schema.NLL(name="nll"))
    tcfg.student = cfg.teacher.model
    tcfg.lr, tcfg.seed = build.lr, build.seed
    tcfg.budget = schema.Budget(flops=None, ot=None, tokens=build.tokens, accounting="exact")
    tcfg.data.vocab_size = cfg.teacher.model.vocab_size
    tcfg.train = C.preset("train", build.train, schema.Train).copy()
    for k in ("device", "precision", "compile", "loss_chunk", "ckpt_every", "log_every"):
        tcfg.train[k] = cfg.train[k]
    tcfg.train.parallel = "auto"  # its own engine: it may be trained before the student's ranks join
    return tcfg


def teacher_key(cfg: DictConfig) -> str:
    """The teacher a distilled run reads, as the MLflow tag hldx.teacher names it: the on-demand teacher's run key
    (its run's hldx.run_key, in whichever experiment pre-trained it), or the given teacher.ckpt."""
    return str(Path(cfg.teacher.ckpt).expanduser()) if cfg.teacher.ckpt else C.run_key(teacher_config(cfg))


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
    for key, allowed in (("values_dtype", VALUE_DTYPES), ("hidden_dtype", HIDDEN_DTYPES)):
        require(c[key] in allowed, f"cache.{key}", c[key], f"one of {', '.join(allowed)}")
    d_T = cfg.teacher.model.hidden_size
    require(c.hidden_dtype != "sr2" or d_T % codec.BLOCK == 0, "cache.hidden_dtype", c.hidden_dtype,
            f"bfloat16, float8_e4m3 or float32 for a teacher of hidden size {d_T} (sr2: a multiple of {codec.BLOCK})")
    require(c.task < c.tasks, "cache.task", c.task, f"a worker index in [0, cache.tasks={c.tasks})")
    if cfg.teacher.source == "cache" and c.logits == "sampled":
        V = cfg.teacher.model.vocab_size
        require(c.draws <= V, "cache.draws", c.draws,
                f"a number of ids drawn per position in [1, {V}] (the vocabulary)")
        taus = sorted(float(t) for t in c.taus)
        require(float(cfg.tau) in taus, "tau", cfg.tau, f"one of cache.taus={taus}: the temperatures a sampled cache "
                                                        f"weighs its draws for (add it to cache.taus)")
    if not launch:
        return
    if OmegaConf.is_missing(cfg.teacher, "ckpt"):
        raise ConfigError(f"teacher.ckpt is not set: pass teacher.ckpt=DIR (the teacher, pre-trained with "
                          f"python -m hldx.run method=nll student={cfg.teacher.model.name})")
    if cfg.teacher.ckpt:
        check_checkpoint(cfg, Path(cfg.teacher.ckpt).expanduser())
    else:
        teacher_config(cfg)  # an on-demand teacher needs its recipe


def _check_shapes(cfg: DictConfig, path: Path) -> None:
    """The teacher saved at `path` (its config.json) against teacher.model's vocabulary, width and depth."""
    if not (path / "config.json").exists():
        raise ConfigError(f"teacher.ckpt={path} holds no checkpoint (config.json missing): point it at the "
                          f"teacher's saved model directory")
    got, want = json.loads((path / "config.json").read_text()), cfg.teacher.model
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if got.get(key) != want[key]:
            raise ConfigError(f"the teacher at {path} has {key}={got.get(key)} but teacher.model.{key}="
                              f"{want[key]}: pick the matching teacher preset or override teacher.model.{key}")


def check_checkpoint(cfg: DictConfig, path: Path) -> None:
    """A given teacher.ckpt, before anything runs: its shapes (config.json) against teacher.model, and the
    tokenizer saved with it against the data's by content digest (once the data's tokenizer exists)."""
    _check_shapes(cfg, path)
    ours = data.built_tokenizer(cfg)
    if (path / "tokenizer.json").exists() and ours is not None:
        theirs = PreTrainedTokenizerFast.from_pretrained(str(path))
        if tokenizer_digest(theirs) != tokenizer_digest(ours):
            raise ConfigError(f"teacher.ckpt={cfg.teacher.ckpt} was trained with another tokenizer than data="
                              f"{cfg.data.name}'s (content digests {tokenizer_digest(theirs)} and "
                              f"{tokenizer_digest(ours)}): the student must read the teacher's tokens")


def load_teacher(cfg: DictConfig) -> torch.nn.Module:
    """The frozen teacher, checked against the configured shape (vocabulary, hidden size)."""
    path = teacher_path(cfg)
    _check_shapes(cfg, path)
    return load_model(str(path)).eval().requires_grad_(False)


class OnlineTeacher:
    """Runs the teacher's forward on a batch: its top-k logits (relative to each position's largest, as the
    cache stores them; or all its logits, `logits`) and/or its hidden states after the layers asked for
    (computing no layer above the deepest of them when no logits are asked for). On a GPU (train.precision auto or
    bf16) the teacher runs in bfloat16 weights and its final norm and LM head in float32, from float32 copies made
    first (the head is tied to the embedding): the top-k is taken from float32 logits, as the cache's stated
    precision assumes (bfloat16 logits near 20 are 0.06 apart). `dtype` overrides the weights' dtype."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None):
        bf16 = device.type == "cuda" and cfg.train.precision != "fp32"
        self.k = cfg.method.get("top_k", 128)
        self.norm = copy.deepcopy(model.model.norm).to(device, torch.float32)
        self.head_VxD = model.lm_head.weight.detach().to(device, torch.float32, copy=True)
        self.softcap = model.config.final_logit_softcapping
        self.model = model.to(device, dtype or (torch.bfloat16 if bf16 else torch.float32))

    @torch.no_grad()
    def __call__(self, tokens_BxL: Tensor, logits: bool, layers: Iterable[int] = ()
                 ) -> tuple[Tensor | None, Tensor | None, dict[int, Tensor]]:
        """(top-k ids, their logits relative to the largest), both None without `logits`, and {layer: its hidden
        states float32} for each of `layers`."""
        if not logits:
            return None, None, {layer: h.float() for layer, h in hidden_states(self.model, tokens_BxL, layers).items()}
        logits_BxLxV, states = self.logits(tokens_BxL, layers)
        topk_val_BxLxK, topk_idx_BxLxK = logits_BxLxV.topk(self.k, dim=-1)
        relative_BxLxK = topk_val_BxLxK - topk_val_BxLxK[..., :1]  # sorted: the first is the largest
        return topk_idx_BxLxK, relative_BxLxK, states

    @torch.no_grad()
    def logits(self, tokens_BxL: Tensor, layers: Iterable[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """All the teacher's logits [B, L, V] float32, and {layer: its hidden states float32} for each of `layers`."""
        h_BxLxD, states = final_state(self.model, tokens_BxL, layers)
        with torch.autocast(h_BxLxD.device.type, enabled=False):  # float32 inside a bf16-autocast training step
            logits_BxLxV = F.linear(self.norm(h_BxLxD.float()), self.head_VxD)
            if self.softcap is not None:
                logits_BxLxV = self.softcap * torch.tanh(logits_BxLxV / self.softcap)
        return logits_BxLxV, {layer: h.float() for layer, h in states.items()}


def teacher_digest(path: Path) -> str:
    """Content hash of a teacher checkpoint: its config and weight files."""
    sha = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def cache_spec(cfg: DictConfig, tokenizer, rows: Rows, plan: RunPlan) -> CacheSpec:
    """The cache of cfg's teacher on the training rows, with the parts and extents cfg's job needs (its logits,
    top-k or sampled, to cache.rows, the hidden states after each teacher layer it reads to cache.hidden_rows: auto
    is what it reads); every method, hyperparameter, seed and layer of a sweep shares it (its part `hidden`: the
    teacher's middle)."""
    spec = dataclasses.replace(shape_spec(cfg), teacher_digest=teacher_digest(teacher_path(cfg)),
                               tokenizer_digest=tokenizer_digest(tokenizer), stream_digest=rows.digest)
    return dataclasses.replace(spec, extents=cache_parts(cfg, plan, rows.count))


def cache_dir(cfg: DictConfig, spec: CacheSpec) -> Path:
    """cache.dir, or (null) the content-addressed <paths.cache>/teacher_cache/<identity digest>."""
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir else \
        Path(cfg.paths.cache).expanduser() / "teacher_cache" / spec.digest


def build_cache(cfg: DictConfig, spec: CacheSpec, rows: Rows, device: torch.device,
                shards: range | None = None, online: OnlineTeacher | None = None) -> bool:
    """Build what `spec`'s extents need of `shards` (default: all) and the cache lacks; whether it is complete.
    The teacher runs as `online`, else as cfg's, loaded only if a shard is missing."""
    teachers = [online] if online is not None else []

    def teacher_fn(tokens_BxL: Tensor, parts: tuple[str, ...]) -> dict[str, tuple[Tensor, ...]]:
        if not teachers:
            teachers.append(OnlineTeacher(cfg, load_teacher(cfg), device))
        layers = [part_layer(spec, part) for part in parts if part_kind(part) == "hidden"]
        tokens_BxL, logits = tokens_BxL.to(device), {}  # encoded on the device
        if "sampled" in parts:
            z_BxLxV, states = teachers[0].logits(tokens_BxL, layers)
            logits["sampled"] = (z_BxLxV,)
        else:
            idx, val, states = teachers[0](tokens_BxL, "topk" in parts, layers)
            logits = {"topk": (idx, val)} if "topk" in parts else {}
        return {hidden_part(spec, layer): (h,) for layer, h in states.items()} | logits

    return build(spec, cache_dir(cfg, spec), teacher_fn,
                 lambda r: torch.from_numpy(rows.tokens_RxL[r].astype(np.int64)), shards,
                 batch_rows=batch_rows(cfg, device))


def batch_rows(cfg: DictConfig, device: torch.device) -> int:
    """Rows per teacher forward of a cache build: cache.batch_rows; auto: 8 on a CPU, on a GPU as many as keep
    the batch's float32 logits (what the top-k is taken from) within 4 GiB."""
    if cfg.cache.batch_rows != "auto":
        return int(cfg.cache.batch_rows)
    if device.type != "cuda":
        return 8
    return max(1, 2**32 // (4 * cfg.train.seq_len * cfg.teacher.model.vocab_size))


def teacher_source(cfg: DictConfig, tokenizer, rows: Rows, plan: RunPlan,
                   device: torch.device) -> CacheReader | OnlineTeacher:
    """What a distilled run reads its teacher from: the cache (teacher.source=cache; built or grown first if
    it lacks rows the run reads, file-locked) or the live model (online)."""
    if cfg.teacher.source == "online":
        return OnlineTeacher(cfg, load_teacher(cfg), device)
    spec = cache_spec(cfg, tokenizer, rows, plan)
    build_cache(cfg, spec, rows, device)
    return open_cache(cache_dir(cfg, spec), spec)
