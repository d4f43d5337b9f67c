"""The config's schema: the type and the allowed range of every key, as structured configs (dataclasses)
registered in Hydra's ConfigStore.

`conf/config.yaml` starts from `hldx_schema`, and each option of the `method` and `data` groups from its own
schema (`schema/method/<name>`, `schema/data/<name>`), so that Hydra rejects an unknown key or a value of the
wrong type while composing. Ranges and choices are the `rule` of a field, checked by `hldx.config.check`.
Values live in conf/ alone: every field here is MISSING (or None for a key an option does not have).

Numbers are typed `Any` with a numeric rule: a typed float would turn the YAML's 54 into 54.0 and change the
run identity (a hash of the composed values).
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass(frozen=True)
class Rule:
    allowed: str                    # what is allowed, as the error message says it
    ok: Callable[[Any], bool]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
    """A number in [lo, hi] (open ends where asked)."""
    if lo is not None and hi is not None:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = "a number"

    def ok(v: Any) -> bool:
        return _is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
    return Rule(text, ok)


def integer(lo: int) -> Rule:
    return Rule(f"an integer >= {lo}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo)


def one_of(*values: str) -> Rule:
    text = " or ".join(values) if len(values) == 2 else f"one of {', '.join(values)}"
    return Rule(text, lambda v: v in values)


def pair(rule: Rule) -> Rule:
    return Rule(f"two numbers, each {rule.allowed.removeprefix('a number ')}",
                lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(rule.ok(x) for x in v))


def layer_pairs() -> Rule:
    return Rule("a non-empty list of [student_layer, teacher_layer] pairs of layers >= 0",
                lambda v: isinstance(v, list) and len(v) > 0 and all(
                    isinstance(p, list) and len(p) == 2 and all(integer(0).ok(x) for x in p) for p in v))


def numbers(rule: Rule) -> Rule:
    return Rule(f"a non-empty list of numbers, each {rule.allowed.removeprefix('a number ')}",
                lambda v: isinstance(v, list) and len(v) > 0 and all(rule.ok(x) for x in v))


def key(rule: Rule | None = None, *, null: bool = False, used_by: tuple[str, ...] | None = None,
        missing_ok: bool = False) -> Any:
    """A schema field: its rule (None: the type says it all), whether null is allowed, the methods that use it
    (a key a method ignores is not checked for that method), and whether it may stay ??? (MISSING) until a
    job needs it."""
    return field(default=MISSING, metadata={"rule": rule, "null": null, "used_by": used_by,
                                            "missing_ok": missing_ok})


DISTILLED = ("kd", "hldc", "hldf")
HLD_METHODS = ("hldc", "hldf")


@dataclass
class Model:
    """A Gemma3 preset (conf/student/*.yaml), also the teacher's `teacher.model`."""
    name: str = key()
    vocab_size: int = key(integer(1))
    hidden_size: int = key(integer(1))
    intermediate_size: int = key(integer(1))
    num_hidden_layers: int = key(integer(1))
    num_attention_heads: int = key(integer(1))
    num_key_value_heads: int = key(integer(1))
    head_dim: int = key(integer(1))
    sliding_window: int = key(integer(1))
    max_position_embeddings: int = key(integer(2))


@dataclass
class NLL:
    name: str = key(one_of("nll", "kd", "hldc", "hldf"))


@dataclass
class KD(NLL):
    top_k: int = key(integer(1))


@dataclass
class HLD(KD):
    regressor_expansion: int = key(integer(1))   # the mlp adapter's hidden width over d_S


@dataclass
class TeacherBuild:
    tokens: int = key(integer(1))
    lr: Any = key(number(0, lo_open=True))
    seed: int = key(integer(0))
    train: str = key(one_of("default", "paper"))   # the conf/train preset it is trained with


@dataclass
class Teacher:
    model: Model = MISSING
    ckpt: Optional[str] = key(null=True, missing_ok=True)   # ??? in a preset: the job asks for it
    source: str = key(one_of("cache", "online"))
    build: Optional[TeacherBuild] = key(null=True)


@dataclass
class Embedded:
    name: str = key(one_of("embedded", "c4"))
    path: Optional[str] = key(null=True)
    max_train_tokens: Optional[int] = key(integer(1), null=True)
    max_validation_tokens: Optional[int] = key(integer(1), null=True)
    vocab_size: int = key(integer(259))
    seed: int = key(integer(0))
    max_epochs: int = key(integer(1))
    workers: int = key(integer(1))
    tasks: int = key(integer(1))


@dataclass
class C4(Embedded):
    train_files: str = key()
    validation_files: str = key()
    tokenizer_documents: int = key(integer(1))
    train_tokens: Any = key(number(1), null=True)


@dataclass
class Budget:
    flops: Any = key(number(0, lo_open=True), null=True)
    ot: Any = key(number(0, lo_open=True), null=True)
    tokens: Any = key(number(0, lo_open=True), null=True)
    accounting: str = key(one_of("exact", "paper"))


@dataclass
class Train:
    seq_len: int = key(integer(2))
    batch_size: int = key(integer(1))
    micro_batch_size: Optional[int] = key(integer(1), null=True)
    warmup_steps: int = key(integer(0))
    warmup_cap: Any = key(number(0, 1, lo_open=True))
    final_lr_fraction: Any = key(number(0, 1))
    weight_decay: Any = key(number(0))
    betas: Any = key(pair(number(0, 1, hi_open=True)))
    eps: Any = key(number(0, lo_open=True))
    grad_clip: Any = key(number(0, lo_open=True), null=True)
    ckpt_every: int = key(integer(1))
    log_every: int = key(integer(1))
    device: str = key(Rule("auto, cpu, cuda or cuda:N", lambda v: v in ("auto", "cpu", "cuda")
                           or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit())))
    precision: str = key(one_of("auto", "bf16", "fp32"))
    parallel: str = key(one_of("auto", "none", "ddp", "fsdp"))
    compile: bool = key()
    loss_chunk: int = key(integer(1))


@dataclass
class Wikitext:
    path: str = key()
    name: str = key()
    split: str = key()


@dataclass
class Eval:
    mode: str = key(one_of("quick", "full"))
    tasks: List[str] = key()
    val_sequences: int = key(integer(1))
    wikitext_sequences: Optional[int] = key(integer(1), null=True)
    limit: Optional[int] = key(integer(1), null=True)
    err_from: Dict[str, str] = key()
    batch_size: int = key(integer(1))
    max_length: int = key(integer(2))
    local_dir: Optional[str] = key(null=True)
    wikitext: Wikitext = MISSING
    json: Optional[str] = key(null=True)
    run_id: Optional[str] = key(null=True)


@dataclass
class Tracking:
    uri: str = key()
    experiment: str = key(Rule("a non-empty name", lambda v: isinstance(v, str) and v.strip() != ""))


def extent(*words: str) -> Rule:
    return Rule(f"{' or '.join(words)} or a row count >= 0",
                lambda v: v in words or (isinstance(v, int) and not isinstance(v, bool) and v >= 0))


@dataclass
class Cache:
    dir: Optional[str] = key(null=True)
    rows_per_shard: int = key(integer(1))
    values_dtype: str = key()
    hidden_dtype: str = key()
    logits: str = key(one_of("topk", "sampled"))
    draws: int = key(integer(1))
    taus: Any = key(numbers(number(0, lo_open=True)))
    rows: Any = key(extent("auto"))
    hidden_rows: Any = key(extent("auto", "all"))
    batch_rows: Any = key(Rule("auto or a row count >= 1", lambda v: v == "auto" or (
        isinstance(v, int) and not isinstance(v, bool) and v >= 1)))
    prefetch: int = key(integer(1))
    readers: int = key(integer(1))
    task: int = key(integer(0))
    tasks: int = key(integer(1))


@dataclass
class Hidden:
    """HLD's hidden path (hldx.hidden): which layers, weighed how, through which adapter, under which loss."""
    pairs: Any = key(layer_pairs(), null=True, used_by=HLD_METHODS)
    student_layer: Optional[int] = key(integer(1), null=True)
    teacher_layer: Optional[int] = key(integer(1), null=True)
    weights: Any = key(numbers(number(0, lo_open=True)), null=True, used_by=HLD_METHODS)
    adapter: Optional[str] = key(one_of("linear", "mlp", "identity"), null=True, used_by=HLD_METHODS)
    loss: str = key(one_of("mse", "mse_sum", "cosine"))  # hldx.losses.hidden_loss


@dataclass
class Paths:
    cache: str = key()
    runs: str = key()


@dataclass
class Plan:
    json: Optional[str] = key(null=True)
    bench: Optional[str] = key(null=True)
    mfu: Any = key(number(0, 1, lo_open=True))
    peak_flops: Any = key(number(0, lo_open=True))
    device_memory: Any = key(number(0, lo_open=True))
    ranks: Optional[int] = key(integer(1), null=True)


@dataclass
class Bench:
    json: Optional[str] = key(null=True)
    steps: int = key(integer(1))
    warmup: int = key(integer(0))
    methods: List[str] = key()
    threads: Optional[int] = key(integer(1), null=True)


@dataclass
class Config:
    """The whole config (conf/config.yaml and its groups)."""
    method: Any = MISSING        # one of NLL, KD, HLD (each option of the group names its schema)
    student: Model = MISSING
    teacher: Teacher = MISSING
    data: Any = MISSING          # Embedded or C4
    budget: Budget = MISSING
    train: Train = MISSING
    eval: Eval = MISSING
    tracking: Tracking = MISSING
    cache: Cache = MISSING
    lr: Any = key(number(0, lo_open=True))
    tau: Any = key(number(0, lo_open=True), used_by=DISTILLED)
    alpha: Any = key(number(0, 1), used_by=DISTILLED)
    gamma: Any = key(number(0), used_by=("hldc",))
    p1: Any = key(number(0, 1, hi_open=True), used_by=("hldf",))
    seed: int = key(integer(0))
    hidden: Hidden = MISSING
    paths: Paths = MISSING
    ckpt: Optional[str] = key(null=True)
    plan: Plan = MISSING
    bench: Bench = MISSING


def register() -> None:
    """Put the schema into Hydra's ConfigStore (idempotent); `hldx.config` calls it when imported."""
    store = ConfigStore.instance()
    store.store(name="hldx_schema", node=Config, provider="hldx")
    for name, node in (("nll", NLL), ("kd", KD), ("hldc", HLD), ("hldf", HLD)):
        store.store(group="schema/method", name=name, node=node, provider="hldx")
    for name, node in (("embedded", Embedded), ("c4", C4)):
        store.store(group="schema/data", name=name, node=node, provider="hldx")
