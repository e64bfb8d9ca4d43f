"""Multi-head attention as OFA uses it: an additive position bias on the logits, queries scaled
by ``(head_dim * scale_factor) ** -0.5`` and optional learned per-head output scales
(NormFormer's ``c_attn``). Parameter names follow OFA so checkpoints load unchanged.

Tensors are time-major inside attention, as in fairseq: `(seq_len, batch, embed_dim)`.
"""
from typing import Dict, Optional

import torch
from fairseq import utils
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]


@with_incremental_state
class OFAAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kv_dim: Optional[int] = None,
        dropout: float = 0.0,
        scale_factor: float = 2.0,
        scale_heads: bool = False,
        encoder_decoder_attention: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kv_dim = kv_dim or embed_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = float(self.head_dim * scale_factor) ** -0.5
        self.encoder_decoder_attention = encoder_decoder_attention
        self.dropout_module = FairseqDropout(dropout, module_name=self.__class__.__name__)
        self.k_proj = nn.Linear(kv_dim, embed_dim)
        self.v_proj = nn.Linear(kv_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None
        gain = 2 ** -0.5 if kv_dim == embed_dim else 1.0
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    # ---------------------------------------------------------------- projections
    def _heads(self, x: Tensor) -> Tensor:
        """`(len, batch, embed_dim)` -> `(batch * heads, len, head_dim)`."""
        return x.contiguous().view(x.size(0), -1, self.head_dim).transpose(0, 1)

    def project_kv(self, x: Tensor):
        """Keys and values of `x` `(len, batch, kv_dim)`, each `(batch, heads, len, head_dim)`,
        contiguous (cached tensors are read at every decoding step)."""
        length, bsz = x.shape[:2]

        def split(t):
            return t.view(length, bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3).contiguous()

        return split(self.k_proj(x)), split(self.v_proj(x))

    # ---------------------------------------------------------------- cache
    def cached_kv(self, incremental_state: IncrementalState) -> Dict[str, Optional[Tensor]]:
        return self.get_incremental_state(incremental_state, "attn_state") or {}

    def append_kv(
        self,
        incremental_state: IncrementalState,
        k: Tensor,
        v: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> None:
        """Append keys/values `(batch, heads, new_len, head_dim)` to the self-attention cache,
        with `padding_mask` `(batch, new_len)` (True at pad) when the new positions hold pads."""
        saved = self.cached_kv(incremental_state)
        prev_mask = saved.get("prev_key_padding_mask")
        if "prev_key" in saved:
            prev_len = saved["prev_key"].size(2)
            k = torch.cat([saved["prev_key"], k], dim=2)
            v = torch.cat([saved["prev_value"], v], dim=2)
        else:
            prev_len = 0
        if prev_mask is not None or padding_mask is not None:
            bsz, new_len = k.size(0), k.size(2) - prev_len
            if prev_mask is None:
                prev_mask = k.new_zeros(bsz, prev_len, dtype=torch.bool)
            if padding_mask is None:
                padding_mask = k.new_zeros(bsz, new_len, dtype=torch.bool)
            prev_mask = torch.cat([prev_mask, padding_mask.to(torch.bool)], dim=1)
        saved["prev_key"], saved["prev_value"] = k, v
        saved["prev_key_padding_mask"] = prev_mask
        self.set_incremental_state(incremental_state, "attn_state", saved)

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        saved = self.get_incremental_state(incremental_state, "attn_state")
        if saved is None:
            return
        for name, value in saved.items():
            if value is None:
                continue
            if self.encoder_decoder_attention and value.size(0) == new_order.size(0):
                break  # static encoder keys are already in beam order
            saved[name] = value.index_select(0, new_order)
        self.set_incremental_state(incremental_state, "attn_state", saved)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        attn_bias: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        rows: Optional[Tensor] = None,
        need_weights: bool = False,
    ):
        """
        Args:
            query: `(tgt_len, batch, embed_dim)`.
            key: `(src_len, batch, kv_dim)`; the query itself for self-attention (None).
            key_padding_mask: `(batch, src_len)`, True at padding (for cached self-attention:
                the mask of this step's new positions).
            attn_bias: additive, broadcastable to `(batch, heads, tgt_len, src_len)` (OFA's
                position bias).
            attn_mask: additive `(tgt_len, src_len)` (causal mask).
            incremental_state: fairseq's decoding cache. Self-attention appends this step's
                keys/values; cross-attention computes the encoder's keys/values once.
            rows: with a cache, the batch rows of the cache that `query` belongs to, ascending
                (early exiting computes only the rows still active); self-attention then expects
                the caller to have appended this step's keys/values for all rows already. For
                cross-attention the caller passes `key_padding_mask` of those rows.
        Returns:
            `(tgt_len, batch, embed_dim)` and, if asked, head-averaged weights `(batch, tgt, src)`.
        """
        tgt_len, bsz, _ = query.shape
        q = self._heads(self.q_proj(query) * self.scaling)
        if incremental_state is None:
            source = query if key is None else key
            k, v = self.project_kv(source)
        elif self.encoder_decoder_attention:
            saved = self.cached_kv(incremental_state)
            if "prev_key" not in saved:
                saved["prev_key"], saved["prev_value"] = self.project_kv(key)
                self.set_incremental_state(incremental_state, "attn_state", saved)
            k, v = saved["prev_key"], saved["prev_value"]
        else:
            if rows is None:
                self.append_kv(incremental_state, *self.project_kv(query), key_padding_mask)
            saved = self.cached_kv(incremental_state)
            k, v = saved["prev_key"], saved["prev_value"]
            key_padding_mask = saved["prev_key_padding_mask"]
        # a subset of the cached rows (early exiting); all rows (a shape check, no sync) needs no copy
        if rows is not None and rows.numel() != k.size(0):
            k, v = k.index_select(0, rows), v.index_select(0, rows)
            if key_padding_mask is not None and not self.encoder_decoder_attention:
                key_padding_mask = key_padding_mask.index_select(0, rows)
        src_len = k.size(2)
        k = k.reshape(bsz * self.num_heads, src_len, self.head_dim)
        v = v.reshape(bsz * self.num_heads, src_len, self.head_dim)

        weights = torch.bmm(q, k.transpose(1, 2)).view(bsz, self.num_heads, tgt_len, src_len)
        if attn_bias is not None:
            weights = weights + attn_bias[..., -src_len:]
        if attn_mask is not None:
            weights = weights + attn_mask
        if key_padding_mask is not None:
            weights = weights.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
        weights = weights.view(bsz * self.num_heads, tgt_len, src_len)
        probs_float = utils.softmax(weights, dim=-1)
        probs = self.dropout_module(probs_float.type_as(weights))
        attn = torch.bmm(probs, v).transpose(0, 1).reshape(tgt_len, bsz, self.num_heads, self.head_dim)
        if self.c_attn is not None:
            attn = attn * self.c_attn[:, None]
        attn = self.out_proj(attn.reshape(tgt_len, bsz, self.embed_dim))
        avg_weights = None
        if need_weights:
            avg_weights = probs_float.view(bsz, self.num_heads, tgt_len, src_len).mean(dim=1)
        return attn, avg_weights
