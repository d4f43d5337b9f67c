"""Evaluation: token-level log-perplexities and lm-eval's downstream tasks (the paper's Table 1), on an
in-memory model or a saved checkpoint (`python -m hldx.evaluate` is the command line).

Tasks (`eval.tasks`) and what they log to MLflow as eval/<task>_<metric>:
  val         logppl: the held-out split of the training corpus (C4 validation in the paper's setting),
              the first eval.val_sequences rows of hldx.data's packed stream (documents joined by <eos>)
  wikitext    logppl: WikiText-103 test; each article (a top-level " = Title = " heading up to the next)
              is its lines joined, tokenized with our tokenizer and followed by <eos>, like the training
              stream; the articles are packed into rows of train.seq_len tokens, the tail is dropped
  hellaswag, piqa, arc_easy, winogrande, lambada
              acc (and acc_norm where the task has it) from lm-eval's own task definitions, prompts and
              scoring; err = 1 - the score named in eval.err_from; n = examples scored
A log-perplexity is the mean negative log-likelihood (nats) per predicted token: every token of a row but
its first, given the tokens before it in that row.

Data: the hub datasets by default (ids in DOWNSTREAM and eval.wikitext); offline, `eval.local_dir=DIR`
makes every task read DIR/<file>.jsonl (hellaswag, piqa, arc_easy, winogrande, lambada_openai,
wikitext103) in its hub dataset's own schema; a folder with a manifest (MANIFEST, written by
`python -m hldx.demotasks`) is labelled by it, and every run carries the tag hldx.eval_data (hub, local,
demo). The held-out split comes from `data` (data.path=DIR for
local shards). A task whose data cannot be read is skipped: `Evaluation.skipped` holds the reason and the
override that fixes it, it is logged as a warning and tagged hldx.eval_skipped.<task>; the others run.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from hldx import data
from hldx.device import device_of
from hldx.errors import ConfigError
from hldx.models import load_model
from hldx.progress import Progress

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Downstream:
    """One lm-eval task as it is run here."""

    task: str           # lm-eval's task name; also the local file's stem (eval.local_dir/<task>.jsonl)
    yaml: str           # its definition, relative to lm_eval/tasks
    split: str          # the split it scores: validation or test
    hub: str            # where lm-eval reads it from (for messages; the definition holds the id)
    scores: tuple       # what it reports that an error rate can derive from
    chance_err: float   # the Random row of Table 1


DOWNSTREAM = {
    "hellaswag": Downstream("hellaswag", "hellaswag/hellaswag.yaml", "validation", "Rowan/hellaswag",
                            ("acc", "acc_norm"), 0.75),
    "piqa": Downstream("piqa", "piqa/piqa.yaml", "validation", "baber/piqa", ("acc", "acc_norm"), 0.5),
    "arc_easy": Downstream("arc_easy", "arc/arc_easy.yaml", "test", "allenai/ai2_arc (ARC-Easy)",
                           ("acc", "acc_norm"), 0.75),
    "winogrande": Downstream("winogrande", "winogrande/default.yaml", "validation",
                             "allenai/winogrande (winogrande_xl)", ("acc",), 0.5),
    "lambada": Downstream("lambada_openai", "lambada/lambada_openai.yaml", "test", "EleutherAI/lambada_openai",
                          ("acc",), 1.0),
}
TASKS = ("val", "wikitext", *DOWNSTREAM)
# Table 1's Random row: chance error rates, the report's reference lines (LAMBADA: ~1, open vocabulary).
RANDOM_ERR = {name: t.chance_err for name, t in DOWNSTREAM.items()}
WIKITEXT_FILE = "wikitext103"
MANIFEST = "hldx-tasks.json"  # in eval.local_dir: what its files are ({"label": "demo", ...}: hldx.demotasks)


@dataclass
class Evaluation:
    """What one evaluation produced: `results` is the JSON of eval.json, `metrics` what MLflow gets."""

    mode: str
    data: str = "hub"   # where the tasks' data came from: hub, local, or a local folder's label (demo)
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # {task: {metric: value}}
    skipped: dict[str, str] = field(default_factory=dict)               # {task: why, and the fix}

    @property
    def metrics(self) -> dict[str, float]:
        return {f"eval/{task}_{k}": v for task, scores in self.results.items() for k, v in scores.items()}

    def tags(self) -> dict[str, str]:
        return {"hldx.eval_mode": self.mode, "hldx.eval_data": self.data,
                **{f"hldx.eval_skipped.{t}": why for t, why in self.skipped.items()}}

    def table(self) -> str:
        lines = [f"{'task':<12}{'metric':<12}{'value':>12}{'random':>9}"]
        for task, scores in self.results.items():
            for i, (k, v) in enumerate(scores.items()):
                chance = f"{RANDOM_ERR[task]:>9.3f}" if k == "err" else ""
                value = f"{int(v):>12d}" if k in ("n", "tokens") else f"{v:>12.4f}"
                lines.append(f"{task if i == 0 else '':<12}{k:<12}{value}{chance}")
        lines += [f"{task:<12}skipped: {why}" for task, why in self.skipped.items()]
        return "\n".join(lines)


# ---- log-perplexity --------------------------------------------------------------------------------------

@torch.no_grad()
def log_perplexity(model: PreTrainedModel, tokens_NxL: torch.Tensor, batch_size: int) -> float:
    """Mean NLL (nats) per predicted token: tokens 1..L-1 of each row, each given the tokens before it."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for rows_BxL in Progress(tokens_NxL.split(batch_size), desc="log-perplexity", leave=False):
        rows_BxL = rows_BxL.to(device)
        logits_BxLxV = model(input_ids=rows_BxL, use_cache=False).logits
        total += F.cross_entropy(logits_BxLxV[:, :-1].flatten(0, 1).float(), rows_BxL[:, 1:].flatten(),
                                 reduction="sum").item()
        count += rows_BxL[:, 1:].numel()
    return total / count


def _rows(tokens_T: np.ndarray, seq_len: int, max_rows: int | None) -> torch.Tensor:
    """The first rows of seq_len tokens of a stream (the tail is dropped), as a LongTensor NxL."""
    n = len(tokens_T) // seq_len
    n = n if max_rows is None else min(n, max_rows)
    if n == 0:
        raise ValueError(f"{len(tokens_T)} tokens do not fill one row of train.seq_len={seq_len}")
    return torch.from_numpy(np.asarray(tokens_T[:n * seq_len], dtype=np.int64)).view(n, seq_len)


def _val_rows(cfg: DictConfig, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    stream = data.prepare(cfg, "validation", tokenizer)
    return _rows(stream.tokens, cfg.train.seq_len, cfg.eval.val_sequences)


def wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText lines grouped into articles: a top-level heading (" = Title = ") starts the next one."""
    articles: list[list[str]] = []
    for line in lines:
        if not articles or (line.startswith(" = ") and not line.startswith(" = = ")):
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


def _wikitext_rows(cfg: DictConfig, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    import datasets

    w = cfg.eval.wikitext
    if cfg.eval.local_dir is None:
        lines = datasets.load_dataset(w.path, w.name, split=w.split)["text"]
    else:
        lines = datasets.load_dataset("json", data_files=str(_local_file(cfg, WIKITEXT_FILE)), split="train")["text"]
    ids = tokenizer(wikitext_articles(lines), add_special_tokens=False)["input_ids"]
    stream_T = np.fromiter((t for doc in ids for t in doc + [tokenizer.eos_token_id]), dtype=np.int64)
    return _rows(stream_T, cfg.train.seq_len, cfg.eval.wikitext_sequences)


# ---- downstream tasks (lm-eval) ------------------------------------------------------------------------------

def _local_path(cfg: DictConfig, stem: str) -> Path:
    return Path(cfg.eval.local_dir).expanduser() / f"{stem}.jsonl"


def _local_file(cfg: DictConfig, stem: str) -> Path:
    if not (path := _local_path(cfg, stem)).is_file():
        raise FileNotFoundError(f"no file {path}")
    return path


def _task_config(spec: Downstream, cfg: DictConfig) -> dict:
    """lm-eval's own definition of the task (included); offline, only where its data is read changes."""
    import lm_eval.tasks

    config = {"include": str(Path(lm_eval.tasks.__file__).parent / spec.yaml), "task": spec.task}
    if cfg.eval.local_dir is not None:
        config |= {"dataset_path": "json", "dataset_name": None,
                   "dataset_kwargs": {"data_files": {spec.split: str(_local_path(cfg, spec.task))}},
                   **{f"{s}_split": (spec.split if s == spec.split else None)
                      for s in ("training", "validation", "test")}}
    return config


def _load_task(manager: TaskManager, cfg: DictConfig, spec: Downstream) -> Task:
    """lm-eval's Task with its data read (from the hub, or the local file that must exist)."""
    if cfg.eval.local_dir is not None:
        _local_file(cfg, spec.task)
    return manager.load([spec.task])["tasks"][spec.task]


@contextmanager
def _rng_kept() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators; the caller's streams are put back."""
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def downstream(lm: LM | Callable[[], LM], cfg: DictConfig, names: list[str],
               skipped: dict[str, str]) -> dict[str, dict[str, float]]:
    """Every task in one lm_eval.simple_evaluate call on `lm` (an lm-eval model, or a function making it once a
    task's data is read); a task whose data fails is skipped (recorded in `skipped`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    local = cfg.eval.local_dir
    with tempfile.TemporaryDirectory() as include:
        for name in names:
            spec = DOWNSTREAM[name]
            (Path(include) / f"{spec.task}.yaml").write_text(yaml.safe_dump(_task_config(spec, cfg)))
        manager = TaskManager(include_path=include, include_defaults=False)
        tasks = {}
        for name in names:
            spec = DOWNSTREAM[name]
            if local is None:
                fix = f"offline, pass eval.local_dir=DIR holding {spec.task}.jsonl in the schema of {spec.hub}"
            else:
                fix = (f"write {spec.task}.jsonl there in the schema of {spec.hub} ({spec.split} split), "
                       f"or pass eval.local_dir=null to read the hub")
            if (task := _attempt(skipped, name, lambda: _load_task(manager, cfg, spec), fix)) is not None:
                tasks[name] = task
        if not tasks:
            return {}
        with _rng_kept():
            out = simple_evaluate(model=lm() if callable(lm) else lm, tasks=list(tasks.values()),
                                  task_manager=manager, limit=cfg.eval.limit,
                                  bootstrap_iters=0, log_samples=False)
    results = {}
    for name in tasks:
        task = DOWNSTREAM[name].task
        scores = {k.removesuffix(",none"): float(v) for k, v in out["results"][task].items()
                  if k.endswith(",none") and "_stderr" not in k}
        scores["err"] = 1.0 - scores[cfg.eval.err_from[name]]
        scores["n"] = float(out["n-samples"][task]["effective"])
        results[name] = scores
    return results


# ---- the suite -------------------------------------------------------------------------------------------------

def _attempt(skipped: dict[str, str], task: str, load: Callable[[], T], fix: str) -> T | None:
    """load(), or None with the task recorded as skipped (the error, then the fix)."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - any failure to read a task's data skips that task only
        log.debug("loading %s failed", task, exc_info=True)
        skipped[task] = f"{type(e).__name__}: {e}; fix: {fix}"
        return None


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for eval.tasks or eval.err_from outside what the suite has (the schema checks the
    other eval.* keys); run it before training: unreadable data only skips a task."""
    e = cfg.eval
    for task in e.tasks:
        if task not in TASKS:
            raise ConfigError(f"eval.tasks has {task!r}: expected a subset of {list(TASKS)}")
        if task in DOWNSTREAM and e.err_from.get(task) not in DOWNSTREAM[task].scores:
            raise ConfigError(f"eval.err_from.{task}={e.err_from.get(task)} is invalid: expected one of "
                              f"{', '.join(DOWNSTREAM[task].scores)}")


def unreadable(cfg: DictConfig) -> dict[str, str]:
    """{task: the fix} for each of eval.tasks (but val, the training corpus's split) whose data cannot be read
    now: offline without eval.local_dir, or its file missing there. Asks the hub once, in seconds."""
    tasks = [t for t in cfg.eval.tasks if t != "val"]
    if cfg.eval.local_dir is None:
        if _hub_answers():
            return {}
        return {t: f"offline, pass eval.local_dir=DIR holding {_stem(t)}.jsonl" for t in tasks}
    return {t: f"write {_local_path(cfg, _stem(t))}" for t in tasks if not _local_path(cfg, _stem(t)).is_file()}


def _stem(task: str) -> str:
    return WIKITEXT_FILE if task == "wikitext" else DOWNSTREAM[task].task


@functools.cache
def _hub_answers(timeout_s: float = 3.0) -> bool:
    """Whether the hub can be reached, asked once in seconds (datasets alone retries each task for ~25 s)."""
    import requests
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        requests.head(constants.ENDPOINT, timeout=timeout_s)
        return True
    except requests.RequestException:
        return False


def data_label(cfg: DictConfig) -> str:
    """hub, local, or the label of eval.local_dir's manifest (demo: the demo's own tasks, not the benchmarks)."""
    if cfg.eval.local_dir is None:
        return "hub"
    manifest = Path(cfg.eval.local_dir).expanduser() / MANIFEST
    return json.loads(manifest.read_text()).get("label", "local") if manifest.is_file() else "local"


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, cfg: DictConfig) -> Evaluation:
    """Run eval.tasks on the model (put back in its train/eval mode afterwards); skip what cannot be read."""
    check(cfg)
    ev = Evaluation(mode=cfg.eval.mode, data=data_label(cfg))
    tasks = list(cfg.eval.tasks)
    was_training = model.training
    model.eval()
    try:
        fixes = {
            "val": f"it is the held-out split of data={cfg.data.name}: see the data.* keys (data.path=DIR: local)",
            "wikitext": (f"offline, pass eval.local_dir=DIR holding {WIKITEXT_FILE}.jsonl ({{text}} lines of "
                         f"{cfg.eval.wikitext.name})" if cfg.eval.local_dir is None else
                         f"write {WIKITEXT_FILE}.jsonl there ({{text}} lines), or pass eval.local_dir=null"),
        }
        if cfg.eval.local_dir is None and not _hub_answers():
            for name in [t for t in tasks if t != "val"]:
                hub = cfg.eval.wikitext.path if name == "wikitext" else DOWNSTREAM[name].hub
                fix = fixes.get(name) or f"offline, pass eval.local_dir=DIR holding {DOWNSTREAM[name].task}.jsonl"
                ev.skipped[name] = f"the Hugging Face Hub does not answer for {hub}; fix: {fix} in the schema of {hub}"
        for name, rows in (("val", _val_rows), ("wikitext", _wikitext_rows)):
            if name not in tasks or name in ev.skipped:
                continue
            tokens_NxL = _attempt(ev.skipped, name, lambda: rows(cfg, tokenizer), fixes[name])
            if tokens_NxL is not None:
                ev.results[name] = {"logppl": log_perplexity(model, tokens_NxL, cfg.eval.batch_size),
                                    "tokens": float(tokens_NxL[:, 1:].numel())}
        if names := [t for t in tasks if t in DOWNSTREAM and t not in ev.skipped]:
            from lm_eval.models.huggingface import HFLM

            def lm() -> HFLM:
                return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
                            max_length=cfg.eval.max_length)
            ev.results |= downstream(lm, cfg, names, ev.skipped)
    finally:
        model.train(was_training)
    ev.results = {t: ev.results[t] for t in tasks if t in ev.results}
    if ev.skipped:  # one line; each task's reason and fix is in its hldx.eval_skipped.<task> tag
        first, why = next(iter(ev.skipped.items()))
        log.warning("eval: %d task(s) skipped (%s); %s: %s%s", len(ev.skipped), ", ".join(ev.skipped), first, why,
                    "; the others' reasons are in the run's hldx.eval_skipped.* tags" if len(ev.skipped) > 1 else "")
    return ev


# ---- a saved checkpoint -------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg: DictConfig) -> Evaluation:
    """Evaluate `ckpt` (an HF model directory with its tokenizer beside it: a student, or a teacher)."""
    ckpt = cfg.get("ckpt")
    if not ckpt or not (Path(ckpt).expanduser() / "config.json").is_file():
        raise ConfigError(f"ckpt={ckpt} is invalid: expected a saved checkpoint directory (config.json, weights "
                          "and tokenizer), e.g. ckpt=runs/<run_key>/final")
    path = str(Path(ckpt).expanduser())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return evaluate(load_model(path).to(device_of(cfg)), tokenizer, cfg)
