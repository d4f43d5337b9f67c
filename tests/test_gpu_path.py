"""What the GPU path does, checked on a CPU where torch can run it: attention without masks where a window
covers the sequence (the flash / cuDNN SDPA path on a GPU), the memory plan against saved-tensor hooks, the
teacher's top-k in float32 from bfloat16 weights, bf16 autocast, torch.compile and FSDP2's mixed precision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hldx import config as C
from hldx.models import attention_masks, build_model, forward


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
