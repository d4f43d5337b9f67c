"""What the GPU path does, checked on a CPU where torch can run it: attention without masks where a window
covers the sequence (the flash / cuDNN SDPA path on a GPU), the memory plan against saved-tensor hooks, the
teacher's top-k in float32 from bfloat16 weights, bf16 autocast, torch.compile and FSDP2's mixed precision."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from omegaconf import OmegaConf

from hldx import config as C
from hldx import data, losses, order
from hldx.budget import layer_activation_bytes
from hldx.device import device_of
from hldx.errors import ConfigError
from hldx.bench.steps import method_phases, random_cache, reads
from hldx.loader import Loader
from hldx.models import attention_masks, build_model, build_regressor, compile_layers, forward
from hldx.store import CacheSpec, decode_logits, encode_topk
from hldx.teacher import OnlineTeacher
from hldx.train import Trainer

ROOT = Path(__file__).resolve().parent.parent


def _sdpa_calls(monkeypatch) -> list[dict]:
    """Record what each scaled_dot_product_attention call gets (transformers reaches it through the module)."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "gqa": enable_gqa, "kv_heads": k.shape[1]})
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


TINY = ["train.seq_len=64", "train.batch_size=4", "data.max_train_tokens=32768"]
# bf16 autocast against fp32: each loss part within 0.2%, the update within 5% (relative L2 norm).
LOSS_RTOL, UPDATE_RTOL = 2e-3, 5e-2


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters' values, whole (an FSDP2 shard gathered), as one host vector."""
    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten().cpu() for p in params])


def _one_step(method: str, device: str, compile: bool, reader, batches, tokenizer, precision: str = "auto",
              parallel: str = "none") -> tuple[dict, torch.Tensor]:
    """The loss parts and the parameter update of one Trainer.step of `method` (SGD, lr 1: the update is minus
    the clipped gradient), under train.precision and train.parallel (an engine but none: in the process group
    this process has joined)."""
    cfg = C.compose(TINY + [f"train.device={device}", f"train.precision={precision}", f"train.parallel={parallel}"])
    dev = torch.device(device)
    trainer = Trainer(cfg, None, batches, reader, Path(tempfile.mkdtemp()), tokenizer, None)
    model = build_model(cfg.student, cfg.seed).to(dev).train()
    if compile:
        compile_layers(model)
    kind = {"hldc": "linear", "ht": "mlp"}.get(method)
    torch.manual_seed(1)
    regressors = [build_regressor(kind, cfg.student.hidden_size, cfg.teacher.model.hidden_size).to(dev)] if kind \
        else None
    phase = method_phases(cfg)[method]
    engine = trainer.engine(phase, model, regressors)
    params = engine.params + engine.extra
    before = _flat(params)
    with Loader(batches, reader, reads(cfg, reader.spec)[method], range(2), dev) as loader:
        sums = trainer.step(phase, engine, torch.optim.SGD(params, lr=1.0), loader.get(0))
        sums.pop("grad_norm")
        if dev.type == "cuda" and parallel == "none":  # the hot loop reads nothing back: a second step, syncs refused
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                trainer.step(phase, engine, torch.optim.SGD(params, lr=0.0), loader.get(1))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    after = _flat(params)
    return {k: float(v) for k, v in sums.items()}, after - before


@pytest.mark.parametrize("seq_len", [32, 64, 96])
def test_no_mask_where_the_window_covers_the_sequence(monkeypatch, seq_len):
    """tiny: window 64. At L <= 64 every layer gets SDPA's is_causal with GQA and no mask (what the flash kernel
    needs); at L = 96 the sliding layers get a mask. Logits as transformers computes them with its own masks."""
    cfg = C.compose(["student=tiny"])
    model = build_model(cfg.student, 0).eval()
    tokens_BxL = torch.randint(0, cfg.student.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=tokens_BxL, attention_mask=torch.ones_like(tokens_BxL)).logits
        calls = _sdpa_calls(monkeypatch)
        logits, _ = forward(model, tokens_BxL)
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    assert len(calls) == len(sliding) and any(sliding)
    covered = seq_len <= cfg.student.sliding_window
    for call, is_sliding in zip(calls, sliding):
        masked = is_sliding and not covered
        assert (call["mask"] is not None) == masked
        assert call["is_causal"] == (not masked) and call["gqa"] == (not masked)
        assert call["kv_heads"] == cfg.student.num_key_value_heads or masked  # K/V not repeated per head
    assert attention_masks(model.config, tokens_BxL)["sliding_attention"] is None or not covered
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def _saved_bytes(model, tokens_BxL: torch.Tensor) -> int:
    """Bytes autograd saves for the backward of a bf16-autocast forward, each storage counted once."""
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        forward(model, tokens_BxL)
    return sum(saved.values())


@pytest.mark.parametrize("student", ["gemma3-123m", "gemma3-735m"])
def test_planned_layer_activations_match_saved_tensors_under_bf16(student):
    """The plan's bytes per token per decoder layer within 15% of what saved-tensor hooks see under bf16
    autocast: (4 layers - 2 layers) at (2 rows - 1 row), so the weights' bf16 casts, the embedding and the
    RoPE tables drop out (a small vocabulary: the head is not what is measured)."""
    cfg = C.compose([f"student={student}"])
    L, saved = 256, {}
    for depth in (2, 4):
        model = build_model(OmegaConf.merge(cfg.student, {"num_hidden_layers": depth, "vocab_size": 512}), 0).train()
        for rows in (1, 2):
            saved[depth, rows] = _saved_bytes(model, torch.randint(0, 512, (rows, L)))
    measured = ((saved[4, 2] - saved[2, 2]) - (saved[4, 1] - saved[2, 1])) / 2 / L
    planned = layer_activation_bytes(cfg.student, gpu=True)
    print(f"{student}: {measured:,.0f} bytes per token per layer measured, {planned:,.0f} planned")
    assert planned == pytest.approx(measured, rel=0.15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
@pytest.mark.parametrize("entry", ["hldx.run", "hldx.bench"])
def test_a_gpu_asked_for_where_torch_sees_none_is_refused_before_any_work(tmp_path, entry):
    """One line naming the key and what torch reports, exit status 2; nothing tokenized, no run started."""
    result = subprocess.run([sys.executable, "-m", entry, "method=nll", "train.device=cuda",
                             f"paths.runs={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "HLDX_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"python -m {entry}: error: train.device=cuda is invalid here: torch {torch.__version__}")
    assert "built without CUDA" in line or "sees 0 CUDA device(s)" in line
    assert not (tmp_path / "cache" / "streams").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("count, local, given", [(8, 3, 3), (1, 3, 0), (2, 0, 0), (2, 3, None)])
def test_each_rank_takes_its_local_gpu(monkeypatch, count, local, given):
    """LOCAL_RANK indexes the GPUs torch sees; a task that sees one GPU takes it; a rank without one is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_RANK", str(local))
    cfg = C.compose(["train.device=cuda"])
    if given is None:
        with pytest.raises(ConfigError, match=f"train.device=cuda is invalid for local rank {local}"):
            device_of(cfg)
    else:
        assert device_of(cfg) == torch.device("cuda", given)


def test_teacher_in_bf16_weights_keeps_the_cache_precision():
    """The teacher as a GPU runs it, bfloat16 weights, on a CPU: its top-k, stored relative to the maximum in
    bfloat16, moves the KD loss by what storage alone costs, against logits computed here from the same bf16
    model's last residual state with the final RMSNorm and tied head in float32; a top-k taken from the
    model's own bf16 logits (what autocast gave) costs several times more."""
    cfg = C.compose(["method=kd", "teacher=tiny"])
    shape = OmegaConf.merge(cfg.teacher.model, {"vocab_size": 32000})
    model = build_model(shape, 0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the largest logits near 20, as the paper's teacher's
        model.lm_head.weight.copy_(3 / shape.hidden_size ** 0.5 * torch.randn(model.lm_head.weight.shape, generator=g))
    W_VxD, w_D, eps = model.lm_head.weight.detach().clone(), model.model.norm.weight.detach().clone(), model.config.rms_norm_eps
    tokens_BxL = torch.randint(0, 32000, (2, 64), generator=g)
    online = OnlineTeacher(cfg, model, torch.device("cpu"), dtype=torch.bfloat16)
    seen = {}  # the last layer's output as the teacher computes it (bfloat16)
    model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    idx, rel, _ = online(tokens_BxL, logits=True)
    with torch.no_grad():
        bf16_logits = model(input_ids=tokens_BxL).logits.float()
        h = (seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]).float()
        exact = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1 + w_D)) @ W_VxD.T
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16 and exact.amax() > 15
    student = exact + 2 * torch.randn(exact.shape, generator=g)
    val, ref_idx = exact.topk(128, dim=-1)
    reference = losses.sparse_kd(student, ref_idx, val, 1.0)

    def stored_error(idx, values):
        stored = decode_logits(*encode_topk(CacheSpec("t", "tok", "s", 64, 128, 32000, 1, 1, "bfloat16", "bfloat16"),
                                          idx, values - values[..., :1]))
        return float((losses.sparse_kd(student, *stored, 1.0) - reference).abs() / reference)

    ours, storage = stored_error(idx, rel), stored_error(ref_idx, val)
    b_val, b_idx = bf16_logits.topk(128, dim=-1)
    autocast_like = stored_error(b_idx, b_val)
    print(f"\nKD-loss error of the stored top-k (largest logits {exact.amax(-1).mean():.1f}): fp32 head on bf16 "
          f"weights {ours:.2e} (storage alone {storage:.2e}), from the bf16 logits {autocast_like:.2e}")
    assert ours <= storage * 1.01 + 1e-8 and autocast_like > 5 * ours


@pytest.fixture(scope="module")
def tiny_inputs(hldx_cache, tmp_path_factory):
    """A teacher cache of random values on the tiny rows: (reader, batches, tokenizer) of _one_step."""
    cfg = C.compose(TINY)
    tokenizer = data.tokenizer_for(cfg)
    rows = order.training_rows(cfg, data.prepare(cfg, "train", tokenizer))
    reader = random_cache(cfg, rows, tmp_path_factory.mktemp("cache"), data.tokenizer_digest(tokenizer))
    return reader, order.Batches(rows, cfg.train.batch_size), tokenizer


def _close(got: tuple[dict, torch.Tensor], want: tuple[dict, torch.Tensor], loss_rtol: float, update_rtol: float):
    (parts, update), (parts_want, update_want) = got, want
    assert parts.keys() == parts_want.keys()
    for k in parts:
        assert parts[k] == pytest.approx(parts_want[k], rel=loss_rtol), k
    assert torch.isfinite(update).all() and (update - update_want).norm() <= update_rtol * update_want.norm()


@pytest.mark.parametrize("method", ["nll", "kd", "hldc", "ht"])
def test_bf16_autocast_on_cpu_against_fp32(tiny_inputs, method):
    """train.precision=bf16 on a CPU: the GPU's autocast branch, within the GPU test's tolerances of fp32."""
    fp32 = _one_step(method, "cpu", False, *tiny_inputs, precision="fp32")
    bf16 = _one_step(method, "cpu", False, *tiny_inputs, precision="bf16")
    _close(bf16, fp32, LOSS_RTOL, UPDATE_RTOL)
    assert bf16[1].ne(fp32[1]).any()  # it did compute in bfloat16


def test_compile_on_cpu_against_eager(tiny_inputs):
    """train.compile on the tiny student through inductor on a CPU, KD under bf16 autocast: as eager."""
    eager = _one_step("kd", "cpu", False, *tiny_inputs, precision="bf16")
    counters.clear()
    start = time.perf_counter()
    compiled = _one_step("kd", "cpu", True, *tiny_inputs, precision="bf16")
    print(f"\ncompile + one KD step of the tiny student on CPU: {time.perf_counter() - start:.1f} s, "
          f"{counters['stats']['unique_graphs']} graph(s)")
    assert counters["stats"]["unique_graphs"] >= 1
    _close(compiled, eager, LOSS_RTOL, UPDATE_RTOL)


@pytest.mark.parametrize("method", ["kd", "ht"])
def test_fsdp2_mixed_precision_on_gloo(tiny_inputs, method):
    """FSDP2 with its bf16 mixed-precision policy (bf16 parameters in compute, fp32 reduction) on gloo, in a
    process group of one, against one process under bf16 autocast."""
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fsdp = _one_step(method, "cpu", False, *tiny_inputs, precision="bf16", parallel="fsdp")
    finally:
        if joined:
            dist.destroy_process_group()
    alone = _one_step(method, "cpu", False, *tiny_inputs, precision="bf16")
    _close(fsdp, alone, LOSS_RTOL, UPDATE_RTOL)
