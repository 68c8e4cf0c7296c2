"""Cross-attention to a few conditioning tokens (MDiT's core blocks) and its kernel.

The memory is built per forward by the model: the conditioning vector after GELU (the time
token) and, when classes are injected as ``memory``, the class embedding. Each block projects
every token kind with its own bias-free key/value Linear (MDiT's ``W_Kc``, ``W_Kt``) and adds
a learned null key/value, so a query can attend to nothing in particular."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .attention import AttentionConfig, QKRope
from .init import zero_linear_


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """(B, heads, N, D) queries, (B, heads, M, D) keys/values -> (B, heads, N, D).

    Under ``kernels.count_attention()`` it records ``2 N M D`` multiply-adds per head (QK^T and
    AV) in the current scope and computes nothing, as the self-attention kernels do."""
    b, h, n, d = q.shape
    if kernels._record(2 * b * h * n * k.shape[-2] * d):
        return torch.empty_like(q)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class CrossAttention(QKRope):
    """Queries from the grid ``(B, H, W, C)``; keys / values from ``memory`` (a dict of
    ``(B, cond_width)`` vectors, one token each) plus an optional learned null token. Logits
    are dot-product and there is no RoPE (``cfg.logits`` / ``cfg.rope`` are not used)."""

    def __init__(
        self, cfg: AttentionConfig, cond_width: int, sources: list[str], null_token: bool = True
    ):
        super().__init__()
        d_model, d_head, bias = cfg.d_model, cfg.d_head, cfg.bias
        self.d_head, self.n_heads, self.sources = d_head, d_model // d_head, list(sources)
        self.zero_init_out = cfg.zero_init_out
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.ModuleDict(
            {s: nn.Linear(cond_width, 2 * d_model, bias=bias) for s in self.sources}
        )
        self.null = nn.Parameter(torch.zeros(2, d_model)) if null_token else None
        self._setup_qk(cfg, self.n_heads, rope=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def init_special(self) -> None:
        if self.null is not None:
            nn.init.normal_(self.null, std=0.02)
        if self.zero_init_out:
            zero_linear_(self.out)

    def forward(self, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        b, hh, ww, c = x.shape
        keys, values = [], []
        if self.null is not None:
            nk, nv = self.null.to(x.dtype)[:, None, :].expand(2, b, c)[:, :, None, :].unbind(0)
            keys.append(nk)
            values.append(nv)  # (B, 1, C)
        for s in self.sources:
            k, v = self.kv[s](memory[s].to(x.dtype))[:, None, :].chunk(2, dim=-1)
            keys.append(k)
            values.append(v)
        k = torch.cat(keys, 1).view(b, -1, self.n_heads, self.d_head).transpose(1, 2)
        v = torch.cat(values, 1).view(b, -1, self.n_heads, self.d_head).transpose(1, 2)
        q = self.q(x).view(b, hh * ww, self.n_heads, self.d_head).transpose(1, 2)
        q, k = self._norm_qk(q, k)
        o = cross_attention(q, k, v, self.d_head**-0.5)  # (B, heads, N, D)
        o = o.transpose(1, 2).reshape(b, hh, ww, c)
        return self.out(self.dropout(o))

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, d_head={self.d_head}, "
            f"tokens={['null'] * (self.null is not None) + self.sources}"
        )
