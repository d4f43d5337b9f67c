"""Gemma3 students and teachers from config, mid-layer taps and the HLD regressors."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import lru_cache

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from hldx.errors import ConfigError

SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings")


def gemma3_config(model_cfg: DictConfig, attn_implementation: str = "sdpa") -> Gemma3TextConfig:
    """The transformers config of a preset (conf/student/*.yaml); every other field is Gemma3's default."""
    config = Gemma3TextConfig(**{k: model_cfg[k] for k in SHAPE_KEYS}, query_pre_attn_scalar=model_cfg["head_dim"],
                              use_cache=False, tie_word_embeddings=True)
    config._attn_implementation = attn_implementation
    return config


def build_model(model_cfg: DictConfig, seed: int, attn_implementation: str = "sdpa") -> Gemma3ForCausalLM:
    """A randomly initialised Gemma3ForCausalLM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(gemma3_config(model_cfg, attn_implementation))


def load_model(path: str, attn_implementation: str = "sdpa") -> Gemma3ForCausalLM:
    """A saved checkpoint (HF format), in float32."""
    return Gemma3ForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                             torch_dtype=torch.float32)


def middle_layer(num_hidden_layers: int, override: int | None = None) -> int:
    """Index into HF hidden_states of the matched layer: D // 2 (the residual stream after layer D/2)."""
    layer = num_hidden_layers // 2 if override is None else int(override)
    if not 1 <= layer <= num_hidden_layers:
        raise ValueError(f"hidden layer {layer} is outside 1..{num_hidden_layers}")
    return layer


def check(cfg: DictConfig) -> None:
    """hidden.student_layer against the student's depth."""
    depth, layer = cfg.student.num_hidden_layers, cfg.hidden.student_layer
    if layer is not None and not 1 <= layer <= depth:
        raise ConfigError(f"hidden.student_layer={layer} is invalid: expected null (the middle) or a layer in "
                          f"1..{depth}")


def count_parameters(model_cfg: DictConfig) -> dict[str, int]:
    """Total, embedding and backbone (total - embedding) parameters, from the config alone."""
    return _count_parameters(tuple(model_cfg[k] for k in SHAPE_KEYS))


@lru_cache(maxsize=None)
def _count_parameters(shape: tuple) -> dict[str, int]:
    with torch.device("meta"):
        model = Gemma3ForCausalLM(gemma3_config(dict(zip(SHAPE_KEYS, shape))))
    total = sum(p.numel() for p in model.parameters())
    embedding = shape[0] * shape[1]
    return {"total": total, "embedding": embedding, "backbone": total - embedding}


class _Branch(torch.autograd.Function):
    """Identity whose backward hands on, as one sum, the gradients that reach its output."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


@contextmanager
def _tap(model: Gemma3ForCausalLM, layer: int):
    """Capture the output of decoder layer `layer` (1-based), i.e. HF hidden_states[layer]. The layers above
    get it through _Branch, so its gradient is (what the layers above send) + (what the tap's user sends), in
    that grouping whatever order autograd runs in: the same sum whether FSDP2 wraps the layers or not."""
    seen: dict[str, Tensor] = {}

    def hook(_module, _args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out
        above = _Branch.apply(seen["h"])
        return (above, *out[1:]) if isinstance(out, tuple) else above

    handle = model.model.layers[layer - 1].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def attention_masks(config: Gemma3TextConfig, tokens_BxL: Tensor) -> dict[str, Tensor | None] | None:
    """The masks Gemma3 builds for an unpadded causal batch under SDPA, made without reading the batch: given
    them, transformers skips its own mask code, whose packed-sequence check reads a device tensor (a host sync
    every forward on a GPU). None wherever a layer's attention is plain causal: full attention, and sliding
    attention whose window covers the sequence (a query at i sees keys j > i - window, so every earlier key
    when L <= window; the paper's L = window = 512). With no mask transformers passes SDPA is_causal and
    enable_gqa, which the flash and cuDNN kernels take (a mask forces the others and repeats K/V per head).
    Only a window shorter than the sequence gets a [1, 1, L, L] mask broadcast over the batch. None for any
    other attention implementation."""
    if config._attn_implementation != "sdpa":
        return None
    B, L = tokens_BxL.shape
    return {"full_attention": None, "sliding_attention": _sliding_mask(config.sliding_window, L, tokens_BxL.device)
            .expand(B, -1, -1, -1) if L > config.sliding_window else None}


@lru_cache(maxsize=8)
def _sliding_mask(window: int, L: int, device: torch.device) -> Tensor:
    return sdpa_mask(batch_size=1, q_length=L, kv_length=L, mask_function=sliding_window_causal_mask_function(window),
                     allow_is_causal_skip=False, device=device)


def forward(model: Gemma3ForCausalLM, tokens_BxL: Tensor, layer: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits, and the hidden state after `layer` when asked for."""
    masks = attention_masks(model.config, tokens_BxL)
    if layer is None:
        return model(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).logits, None
    with _tap(model, layer) as seen:
        logits_BxLxV = model(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).logits
    return logits_BxLxV, seen["h"]


def final_state(model: Gemma3ForCausalLM, tokens_BxL: Tensor, layer: int | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """The residual stream after the last decoder layer, before the final norm (the model's dtype), and the
    hidden state after `layer` when asked for; no norm, no head: its caller computes those as it needs."""
    body, masks = truncated(model, model.config.num_hidden_layers), attention_masks(model.config, tokens_BxL)
    if layer is None:
        return body(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).last_hidden_state, None
    with _tap(model, layer) as seen:
        h_BxLxD = body(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).last_hidden_state
    return h_BxLxD, seen["h"]


def truncated(model: Gemma3ForCausalLM, layer: int) -> nn.Module:
    """The backbone up to decoder layer `layer`, sharing its modules: the embedding and the first `layer` layers,
    no final norm, so its last_hidden_state is HF's hidden_states[layer] and nothing above it runs."""
    body = copy.copy(model.model)
    body._modules = dict(body._modules)
    body.layers, body.norm = nn.ModuleList(list(model.model.layers)[:layer]), nn.Identity()
    return body


def forward_to_layer(model: Gemma3ForCausalLM, tokens_BxL: Tensor, layer: int, **model_kwargs) -> Tensor:
    """The hidden state after `layer`, computing only the embedding and the first `layer` layers."""
    model_kwargs.setdefault("attention_mask", attention_masks(model.config, tokens_BxL))
    return truncated(model, layer)(input_ids=tokens_BxL, use_cache=False, **model_kwargs).last_hidden_state


class PhaseNet(nn.Module):
    """What one phase trains, as one module (what DDP or FSDP2 wraps), its forward giving what the loss needs:
    (logits, None) for NLL and KD; (logits, W_R h) for HLDC, the linear regressor on the tapped layer's
    state h; (None, MLP(h)) for HLDF's phase 1, whose module holds only the embedding, the first layers and
    the regressor (`bottom`). Its parameter names are the student's (`lm.` or `body.` in front) and the
    regressor's (`regressor.`)."""

    def __init__(self, lm: Gemma3ForCausalLM, layer: int, regressor: nn.Module | None = None, bottom: bool = False):
        super().__init__()
        self.layer, self.config = layer, lm.config
        if bottom:
            self.body = truncated(lm, layer)
        else:
            self.lm = lm
        self.regressor = regressor

    def forward(self, tokens_BxL: Tensor) -> tuple[Tensor | None, Tensor | None]:
        masks = attention_masks(self.config, tokens_BxL)
        if hasattr(self, "body"):
            hidden = self.body(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).last_hidden_state
            return None, self.regressor(hidden)
        if self.regressor is None:
            return self.lm(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).logits, None
        with _tap(self.lm, self.layer) as seen:
            logits_BxLxV = self.lm(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).logits
        return logits_BxLxV, self.regressor(seen["h"])

    def layers(self) -> list[nn.Module]:
        """The decoder layers it runs (FSDP2 shards each on its own)."""
        return list(self.body.layers if hasattr(self, "body") else self.lm.model.layers)

    @staticmethod
    def student_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A PhaseNet state dict as the student's (Gemma3ForCausalLM) keys: the regressor's dropped."""
        out = {}
        for key, value in state.items():
            if key.startswith("lm."):
                out[key[3:]] = value
            elif key.startswith("body."):
                out["model." + key[5:]] = value
        return out


def compile_layers(model: nn.Module) -> None:
    """train.compile: each decoder layer's forward through torch.compile, in place. The module tree stays as
    it is, so the mid-layer taps (forward hooks) and HLDF's truncated forward work as they do eagerly."""
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward)


def bottom_parameters(model: Gemma3ForCausalLM, layer: int) -> list[nn.Parameter]:
    """What HLDF's phase 1 trains: the (tied) embedding and the first `layer` decoder layers."""
    return list(model.model.embed_tokens.parameters()) + [
        p for block in model.model.layers[:layer] for p in block.parameters()]


def build_regressor(kind: str, d_student: int, d_teacher: int, expansion: int = 4) -> nn.Module:
    """HLDC's linear W_R: d_S -> d_T, or HLDF's one-hidden-layer MLP.

    The paper's "expansion factor 4 (matching the student's feed-forward layers)" is read as a hidden width
    of 4 * d_S (Gemma3 270M's own FFN ratio is 3.2, 1B's is 6), with a GELU between the two projections.
    """
    if kind == "linear":
        return nn.Linear(d_student, d_teacher, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_student, expansion * d_student), nn.GELU(),
                             nn.Linear(expansion * d_student, d_teacher))
    raise ValueError(f"unknown regressor kind {kind!r}: expected linear or mlp")
