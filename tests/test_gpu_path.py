"""What the GPU path does, checked on a CPU where torch can run it: attention without masks where a window
covers the sequence (the flash / cuDNN SDPA path on a GPU), the memory plan against saved-tensor hooks, the
teacher's top-k in float32 from bfloat16 weights, bf16 autocast, torch.compile and FSDP2's mixed precision."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hldx import config as C
from hldx.budget import layer_activation_bytes
from hldx.device import device_of
from hldx.errors import ConfigError
from hldx.models import attention_masks, build_model, forward

ROOT = Path(__file__).resolve().parent.parent


def _sdpa_calls(monkeypatch) -> list[dict]:
    """Record what each scaled_dot_product_attention call gets (transformers reaches it through the module)."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "gqa": enable_gqa, "kv_heads": k.shape[1]})
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


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
