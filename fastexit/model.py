"""EarlyExitTransformer: a pre-norm causal decoder whose every layer can predict the next token.

Each layer i has its own exit norm; all exits share one LM head (optionally tied to the token
embedding), so the exit logits of layer i are ``lm_head(exit_norms[i-1](h_i))``.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import routing
from .kernels import gemm


@dataclass
class ModelConfig:
    vocab_size: int
    n_layers: int = 3
    d_model: int = 256
    n_heads: int = 4
    d_ff: Optional[int] = None          # default 4 * d_model
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Linear(nn.Linear):
    """nn.Linear without bias whose fp32 CPU GEMMs (forward and backward) run through oneDNN
    (kernels/gemm.py: 2-3x MKL's sgemm on AMD CPUs); on CUDA it is plain F.linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.fp32_linear(x, self.weight)


class Attention(nn.Module):
    """Causal multi-head self-attention (SDPA). Q and KV are separate projections so that
    routing can compute queries for hard tokens only and keys/values for every position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_model = cfg.n_heads, cfg.d_model
        self.q_proj = Linear(cfg.d_model, cfg.d_model)
        self.kv_proj = Linear(cfg.d_model, 2 * cfg.d_model)
        self.out_proj = Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, hd)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        q = self.split_heads(self.q_proj(x))
        k, v = map(self.split_heads, self.kv_proj(x).split(self.d_model, dim=-1))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out_proj(self.merge_heads(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        x = x + self.resid_dropout(self.attn(self.attn_norm(x)))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class EarlyExitTransformer(nn.Module):
    """Causal LM with an exit (norm + shared head) after every block.

    ``forward(idx)`` returns the final layer's logits (B, T, V), so the model drops into code
    that expects a plain LM; ``exit_hidden_states`` gives the exit-normed states the fused
    loss and the routing paths consume.
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

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, shared tensors counted once; without position embeddings by default
        (and without the token embedding too when the head is untied, as it does no compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def check_idx(self, idx: torch.Tensor) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an int64 tensor (B, T), got {got}")
        if idx.numel() == 0:
            raise ValueError(f"idx must be non-empty, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"idx has {idx.shape[1]} positions, more than max_seq_len={self.cfg.max_seq_len}")

    def embed(self, idx: torch.Tensor, start_pos: int = 0,
              positions: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, T) -> (B, T, d)
        """Token + learned position embeddings; positions (B, T) int64 overrides start_pos."""
        pos = positions if positions is not None else torch.arange(start_pos, start_pos + idx.shape[1],
                                                                   device=idx.device)
        return self.emb_dropout(self.tok_emb(idx) + self.pos_emb(pos))

    def exit_hidden_states(self, idx: torch.Tensor, layers: Sequence[int]) -> List[torch.Tensor]:
        """Exit-normed hidden states (B, T, d) after each of ``layers`` (1-indexed), in the
        order given; no block deeper than ``max(layers)`` runs."""
        self.check_idx(idx)
        layers = list(layers)
        if not layers or any(not isinstance(i, int) or not 1 <= i <= self.n_layers for i in layers):
            raise ValueError(f"layers must be a non-empty list of ints in 1..{self.n_layers}, got {layers!r}")
        x, states = self.embed(idx), {}
        for i, block in enumerate(self.blocks[:max(layers)], start=1):
            x = block(x)
            if i in layers:
                states[i] = self.exit_norms[i - 1](x)
        return [states[i] for i in layers]

    def exit_logits(self, idx: torch.Tensor, layers: Sequence[int]) -> List[torch.Tensor]:
        """Full logits (B, T, V) of each requested exit. Holds [B*T, V] per layer: use it for
        small batches and tests; training and evaluation go through the fused kernels."""
        return [self.lm_head(h) for h in self.exit_hidden_states(idx, layers)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.exit_logits(idx, [self.n_layers])[0]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, routing_threshold: Optional[float] = None,
                 exit_layer: int = 1, **kwargs):
        """Early-exit decoding with a KV cache, rows exiting independently; returns
        (tokens (B, T0 + max_new_tokens), exit_layers (B, max_new_tokens)). Options and
        semantics: ``fastexit.routing.generate``."""
        return routing.generate(self, idx, max_new_tokens, routing_threshold, exit_layer, **kwargs)
