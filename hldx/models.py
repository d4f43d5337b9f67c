"""Gemma3 students and teachers from config, hidden-state taps and the HLD adapters (regressors)."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

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
def _taps(backbone: nn.Module, layers: Iterable[int]):
    """Capture the hidden state after each of `layers` of a backbone (a Gemma3 model's `model`, or a truncated
    one): the output of decoder layer l (1-based), i.e. HF hidden_states[l]; l = 0, the embedding's output. What
    comes next gets it through _Branch, so its gradient is (what the layers above send) + (what the tap's user
    sends), in that grouping whatever order autograd runs in: the same sum whether FSDP2 wraps the layers or not."""
    seen: dict[int, Tensor] = {}

    def hook(layer, _module, _args, out):
        seen[layer] = out[0] if isinstance(out, tuple) else out
        above = _Branch.apply(seen[layer])
        return (above, *out[1:]) if isinstance(out, tuple) else above

    handles = [(backbone.layers[layer - 1] if layer else backbone.embed_tokens).register_forward_hook(
        lambda *args, layer=layer: hook(layer, *args)) for layer in set(layers)]
    try:
        yield seen
    finally:
        for handle in handles:
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


def forward(model: Gemma3ForCausalLM, tokens_BxL: Tensor, layers: Iterable[int] = ()
            ) -> tuple[Tensor, dict[int, Tensor]]:
    """Logits, and the hidden state after each of `layers`."""
    with _taps(model.model, layers) as seen:
        logits_BxLxV = model(input_ids=tokens_BxL, attention_mask=attention_masks(model.config, tokens_BxL),
                             use_cache=False).logits
    return logits_BxLxV, seen


def final_state(model: Gemma3ForCausalLM, tokens_BxL: Tensor, layers: Iterable[int] = ()
                ) -> tuple[Tensor, dict[int, Tensor]]:
    """The residual stream after the last decoder layer, before the final norm (the model's dtype), and the
    hidden state after each of `layers`; no norm, no head: its caller computes those as it needs."""
    body, masks = truncated(model, model.config.num_hidden_layers), attention_masks(model.config, tokens_BxL)
    with _taps(body, layers) as seen:
        h_BxLxD = body(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).last_hidden_state
    return h_BxLxD, seen


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


def hidden_states(model: Gemma3ForCausalLM, tokens_BxL: Tensor, layers: Iterable[int], **model_kwargs
                  ) -> dict[int, Tensor]:
    """The hidden state after each of `layers`, computing only the embedding and the layers up to the deepest."""
    layers = set(layers)
    top = max(layers)
    with _taps(model.model, layers - {top}) as seen:
        seen[top] = forward_to_layer(model, tokens_BxL, top, **model_kwargs)
    return seen


class PhaseNet(nn.Module):
    """What one phase trains, as one module (what DDP or FSDP2 wraps), its forward giving what the loss needs:
    (logits, None) for NLL and KD; (logits, [R_i h_i]) for HLDC, each pair's adapter R_i on its student layer's
    state h_i (`taps`: the student layer of each pair); (None, [R_i h_i]) for HLDF's phase 1, whose module holds
    only the embedding, the layers up to the deepest tapped one and the adapters (`bottom`). Its parameter names
    are the student's (`lm.` or `body.` in front) and the adapters' (`regressor.`: one pair's adapter under that
    name, as before pairs existed, so older checkpoints resume; several as `regressor.<i>.`)."""

    def __init__(self, lm: Gemma3ForCausalLM, taps: Sequence[int] = (), regressors: Sequence[nn.Module] = (),
                 bottom: bool = False):
        super().__init__()
        self.taps, self.config = tuple(taps), lm.config
        if bottom:
            self.body = truncated(lm, max(self.taps))
        else:
            self.lm = lm
        self.regressor = None if not regressors else regressors[0] if len(regressors) == 1 else \
            nn.ModuleList(regressors)

    def forward(self, tokens_BxL: Tensor) -> tuple[Tensor | None, list[Tensor] | None]:
        masks = attention_masks(self.config, tokens_BxL)
        if hasattr(self, "body"):
            top = max(self.taps)
            with _taps(self.body, set(self.taps) - {top}) as seen:
                seen[top] = self.body(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).last_hidden_state
            return None, self._adapted(seen)
        if self.regressor is None:
            return self.lm(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).logits, None
        with _taps(self.lm.model, self.taps) as seen:
            logits_BxLxV = self.lm(input_ids=tokens_BxL, attention_mask=masks, use_cache=False).logits
        return logits_BxLxV, self._adapted(seen)

    def _adapted(self, seen: dict[int, Tensor]) -> list[Tensor]:
        """Each pair's adapter on its student layer's state, in the pairs' order."""
        adapters = self.regressor if isinstance(self.regressor, nn.ModuleList) else [self.regressor]
        return [adapt(seen[layer]) for adapt, layer in zip(adapters, self.taps)]

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


def build_regressor(kind: str, d_student: int, d_teacher: int, expansion: int = 4) -> nn.Module:
    """An adapter (hidden.adapter): `linear`, W_R: d_S -> d_T (HLDC's); `mlp`, one hidden layer (HLDF's);
    `identity` (d_S = d_T). Initialised as PyTorch initialises nn.Linear (Kaiming-uniform weights, a = sqrt(5);
    the MLP's biases uniform in +-1/sqrt(fan_in)): the initialisation hldx has always used.

    The paper's "expansion factor 4 (matching the student's feed-forward layers)" is read as a hidden width
    of 4 * d_S (Gemma3 270M's own FFN ratio is 3.2, 1B's is 6), with a GELU between the two projections.
    """
    if kind == "linear":
        return nn.Linear(d_student, d_teacher, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_student, expansion * d_student), nn.GELU(),
                             nn.Linear(expansion * d_student, d_teacher))
    if kind == "identity" and d_student == d_teacher:
        return nn.Identity()
    raise ValueError(f"unknown adapter {kind!r} from {d_student} to {d_teacher} dimensions: expected linear, mlp "
                     f"or (between equal widths) identity")
