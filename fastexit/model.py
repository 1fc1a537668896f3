"""Early-exit models: the behaviour every kind shares, and fastexit's own transformer.

``EarlyExitModel`` implements the interface of ``fastexit.protocol`` (the exit loop and its
checks, layer dropout's kept rows, exit logits, confidence heads, KV caches, generation) from
the parts a kind of model supplies: ``cfg``, ``blocks``, ``exit_norms``, ``lm_head`` and
``embed``. ``EarlyExitTransformer`` is the native kind, a pre-norm causal decoder whose layer
i exits through its own norm into the shared head: ``lm_head(exit_norms[i-1](h_i))``;
``fastexit.hf.HFEarlyExit`` is the transformers kind.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import mod
from .config import ModelConfig, check_routed_blocks
from .generate import Generation, generate
from .kernels import replace_rows, select_rows
from .layers import (Attention, Block, ConfidenceHeads, KVCache, Linear, QueryGrid, check_token_ids,
                     padding_layout)

__all__ = ["Attention", "Block", "ConfidenceHeads", "EarlyExitModel", "EarlyExitTransformer", "KVCache", "ModelConfig",
           "QueryGrid", "add_confidence_heads", "padding_layout"]


def add_confidence_heads(model: nn.Module, layers: Sequence[int]) -> None:
    """Give ``model`` (an ``EarlyExitModel``) a confidence head at each of ``layers``
    (1-indexed) that lacks one, as ``model.confidence_heads``."""
    layers = list(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= model.n_layers for i in layers):
        raise ValueError(f"layers must be a non-empty list of ints in 1..{model.n_layers}, got {layers!r}")
    if not hasattr(model, "confidence_heads"):
        model.confidence_heads = ConfidenceHeads()
    model.confidence_heads.add(layers, model.lm_head.weight)


class EarlyExitModel(nn.Module):
    """The shared behaviour of early-exit models (``fastexit.protocol``), from the parts a kind
    supplies: ``cfg`` (.vocab_size, .n_layers, .d_model, .max_seq_len), ``blocks`` (one per
    layer, with the block interface of ``fastexit.layers``), ``exit_norms`` (one per layer),
    ``lm_head`` (.weight (V, d)) and ``embed(idx, start_pos=0, positions=None)``.

    ``forward(idx)`` returns the final layer's logits (B, T, V), so a model drops into code
    that expects a plain LM; ``exit_hidden_states`` gives the exit-normed states the fused
    loss and the routing paths consume.
    """

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def check_idx(self, idx: torch.Tensor) -> None:
        check_token_ids(idx, self.cfg.max_seq_len)

    def add_confidence_heads(self, layers: Sequence[int]) -> None:
        """``confidence_heads`` at each of ``layers`` that lacks one (``ConfidenceHeads``); a
        model without them has neither the attribute nor its state-dict keys."""
        add_confidence_heads(self, layers)

    def add_routers(self, layers: Sequence[int], capacity: float) -> None:
        """Make the blocks at ``layers`` (1-indexed) Mixture-of-Depths routed blocks of
        ``capacity`` in (0, 1] (``fastexit.mod``): a ``Router`` each, in ``model.mod_routers``.
        A model without routers has neither the attribute nor its state-dict keys."""
        layers = list(layers)
        check_routed_blocks(layers, capacity, self.n_layers)
        if not hasattr(self, "mod_routers"):
            self.mod_routers = mod.Routers()
        self.mod_routers.add(layers, capacity, self.lm_head.weight)

    def exit_hidden_states(self, idx: torch.Tensor, layers: Sequence[int],
                           drops: Optional[Sequence[Sequence[bool]]] = None, *,
                           attention_mask: Optional[torch.Tensor] = None,
                           routes: Optional[Dict[int, "mod.Route"]] = None) -> List[torch.Tensor]:
        """Exit-normed hidden states (B, T, d) after each of ``layers`` (1-indexed), in the
        order given; no block deeper than ``max(layers)`` runs.

        ``drops[l][b]`` (layer dropout, ``LayerDropout.draw``): sequence b skips block l + 1,
        its residual stream passing through unchanged. The block then runs on the other rows
        only, compacted into a smaller batch, so dropped rows cost it no work.
        ``attention_mask`` (B, T), True/1 on real tokens (``padding_layout``): pads are never
        attended to and positions count from each row's first real token.
        Routed blocks (``mod_routers``) run the tokens top-k picks in training mode and those
        their predictor picks otherwise (``fastexit.mod``); ``routes``, a dict, receives each
        routed block's decisions {layer: mod.Route}.
        """
        self.check_idx(idx)
        layers = list(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= self.n_layers
                             for i in layers):
            raise ValueError(f"layers must be a non-empty list of ints in 1..{self.n_layers}, got {layers!r}")
        self._check_drops(drops, idx.shape[0])
        positions, mask = padding_layout(attention_mask, idx) if attention_mask is not None else (None, None)
        real = attention_mask.bool() if attention_mask is not None else None
        x, states = self.embed(idx, positions=positions), {}
        for i in range(1, max(layers) + 1):
            run = lambda x, mask, real, i=i: mod.run_block(self, i, x, mask, real, routes)  # noqa: E731
            x = run(x, mask, real) if drops is None else _run_kept_rows(run, x, drops[i - 1], mask, real)
            if i in layers:
                states[i] = self.exit_norms[i - 1](x)
        return [states[i] for i in layers]

    def _check_drops(self, drops, batch: int) -> None:
        if drops is None:
            return
        if len(drops) != self.n_layers or any(len(row) != batch for row in drops):
            raise ValueError(f"drops must be {self.n_layers} rows (one per block) of {batch} bools "
                             f"(one per sequence), got {len(drops)} rows")

    def exit_logits(self, idx: torch.Tensor, layers: Sequence[int],
                    attention_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Full logits (B, T, V) of each requested exit. Holds [B*T, V] per layer: use it for
        small batches and tests; training and evaluation go through the fused kernels."""
        return [self.lm_head(h) for h in self.exit_hidden_states(idx, layers, attention_mask=attention_mask)]

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) int64 -> the final layer's logits (B, T, V)."""
        return self.exit_logits(idx, [self.n_layers], attention_mask=attention_mask)[0]

    def new_kv_caches(self, batch: int, max_len: int, layers: Sequence[int], zeroed: bool = False) -> List[KVCache]:
        """KV caches (B, H, max_len, hd) for the given blocks (1-indexed); ``zeroed`` where masked
        slots may be read before they are written (a masked NaN key still poisons attention).
        A routed block's cache is zeroed and records the slots it writes (``KVCache.written``)."""
        caches = []
        for i in layers:
            routed = mod.router_at(self, i) is not None
            cache = self.blocks[i - 1].new_cache(batch, max_len, zeroed or routed)
            caches.append(mod.track_writes(cache) if routed else cache)
        return caches

    def generate(self, idx: torch.Tensor, max_new_tokens: int, routing_threshold=None, exit_layer=None,
                 **kwargs) -> Generation:
        """Early-exit decoding with a KV cache, rows exiting independently, or lossless
        self-speculative decoding with ``speculative=k``; returns a ``Generation`` (tokens,
        layers_run, ...). Options and semantics: ``fastexit.generate.generate``."""
        return generate(self, idx, max_new_tokens, routing_threshold, exit_layer, **kwargs)


def _run_kept_rows(run, x: torch.Tensor, dropped: Sequence[bool], mask: Optional[torch.Tensor] = None,
                   real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``run(x, mask, real)`` (a block on every token) on the rows of x (B, T, d) that
    ``dropped`` keeps; dropped rows pass through."""
    kept = [b for b, drop in enumerate(dropped) if not drop]
    if len(kept) == x.shape[0]:
        return run(x, mask, real)
    # No kept row still runs the block on zero rows: under FSDP2 every rank must take part
    # in the block's all-gather, whatever its own draws (and the gradient is a true zero).
    rows = torch.tensor(kept, dtype=torch.long).to(x.device, non_blocking=True)  # (k,)
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return replace_rows(x, rows, run(select_rows(x, rows), pick(mask), pick(real)))


class EarlyExitTransformer(EarlyExitModel):
    """Causal LM with an exit (norm + shared head) after every block.

    Its parts: token + learned position embeddings, ``Block`` s, an RMSNorm per exit, and one
    head (tied to the token embedding unless ``cfg.tie_embeddings`` is False); the rest is
    ``EarlyExitModel``'s.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.exit_norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.mod_layers is not None:  # after the initialisation above: the plain model draws the same numbers
            self.add_routers(cfg.mod_layers, cfg.mod_capacity)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, shared tensors counted once; without position embeddings by default
        (and without the token embedding too when the head is untied, as it does no compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def embed(self, idx: torch.Tensor, start_pos: int = 0,
              positions: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T) -> (B, T, d)
        """Token + learned position embeddings; positions (B, T) int64 overrides start_pos."""
        pos = positions if positions is not None else torch.arange(start_pos, start_pos + idx.shape[1],
                                                                   device=idx.device)
        return self.emb_dropout(self.tok_emb(idx) + self.pos_emb(pos))
