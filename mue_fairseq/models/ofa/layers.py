"""Pre-/post-LN transformer layers of OFA with NormFormer's extra scaling layer norms
(``attn_ln``/``self_attn_ln``/``cross_attn_ln`` after attention, ``ffn_layernorm`` inside the
FFN, ``c_attn`` head scales) and drop-path on the residual branches.

Layers take typed arguments (`LayerConfig`), never `args`. Tensors are time-major:
`(seq_len, batch, embed_dim)`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from fairseq import utils
from fairseq.modules import LayerNorm
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

from .attention import IncrementalState, OFAAttention


@dataclass
class LayerConfig:
    embed_dim: int
    ffn_dim: int
    num_heads: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_fn: str = "gelu"
    normalize_before: bool = True
    attn_scale_factor: float = 2.0
    scale_attn: bool = False
    scale_fc: bool = False
    scale_heads: bool = False
    drop_path_rate: float = 0.0


class DropPath(nn.Module):
    """Stochastic depth on a residual branch; one draw per sample (batch is dim 1)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = (keep + torch.rand((1, x.size(1), 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _maybe_ln(enabled: bool, dim: int) -> Optional[nn.Module]:
    return LayerNorm(dim) if enabled else None


class _LayerBase(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.normalize_before = cfg.normalize_before
        self.dropout_module = FairseqDropout(cfg.dropout, module_name=self.__class__.__name__)
        self.activation_dropout_module = FairseqDropout(
            cfg.activation_dropout, module_name=self.__class__.__name__
        )
        self.activation_fn = utils.get_activation_fn(cfg.activation_fn)
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()

    def _attention_block(self, x, pre_ln, post_ln, run_attention):
        residual = x
        if self.normalize_before:
            x = pre_ln(x)
        x, weights = run_attention(x)
        if post_ln is not None:
            x = post_ln(x)
        x = residual + self.drop_path(self.dropout_module(x))
        if not self.normalize_before:
            x = pre_ln(x)
        return x, weights

    def _ffn_block(self, x):
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.activation_dropout_module(self.activation_fn(self.fc1(x)))
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        x = self.dropout_module(self.fc2(x))
        x = residual + self.drop_path(x)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x

    def _build_ffn(self, cfg: LayerConfig):
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = _maybe_ln(cfg.scale_fc, cfg.ffn_dim)
        self.final_layer_norm = LayerNorm(cfg.embed_dim)


class OFAEncoderLayer(_LayerBase):
    def __init__(self, cfg: LayerConfig):
        super().__init__(cfg)
        self.self_attn = OFAAttention(
            cfg.embed_dim, cfg.num_heads, dropout=cfg.attention_dropout,
            scale_factor=cfg.attn_scale_factor, scale_heads=cfg.scale_heads,
        )
        self.self_attn_layer_norm = LayerNorm(cfg.embed_dim)
        self.attn_ln = _maybe_ln(cfg.scale_attn, cfg.embed_dim)
        self._build_ffn(cfg)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor], attn_bias: Tensor) -> Tensor:
        """x: `(seq_len, batch, embed_dim)`; padding_mask: `(batch, seq_len)` or None;
        attn_bias: broadcastable to `(batch, heads, seq_len, seq_len)`."""
        x, _ = self._attention_block(
            x, self.self_attn_layer_norm, self.attn_ln,
            lambda h: self.self_attn(h, key_padding_mask=padding_mask, attn_bias=attn_bias),
        )
        return self._ffn_block(x)


class OFADecoderLayer(_LayerBase):
    def __init__(self, cfg: LayerConfig, encoder_embed_dim: Optional[int] = None):
        super().__init__(cfg)
        self.self_attn = OFAAttention(
            cfg.embed_dim, cfg.num_heads, dropout=cfg.attention_dropout,
            scale_factor=cfg.attn_scale_factor, scale_heads=cfg.scale_heads,
        )
        self.self_attn_ln = _maybe_ln(cfg.scale_attn, cfg.embed_dim)
        self.cross_attn_ln = _maybe_ln(cfg.scale_attn, cfg.embed_dim)
        self.self_attn_layer_norm = LayerNorm(cfg.embed_dim)
        self.encoder_attn = OFAAttention(
            cfg.embed_dim, cfg.num_heads, kv_dim=encoder_embed_dim or cfg.embed_dim,
            dropout=cfg.attention_dropout, scale_factor=cfg.attn_scale_factor,
            scale_heads=cfg.scale_heads, encoder_decoder_attention=True,
        )
        self.encoder_attn_layer_norm = LayerNorm(cfg.embed_dim)
        self._build_ffn(cfg)

    def self_attn_input(self, x: Tensor) -> Tensor:
        """What this layer's self-attention projects keys/values from (pre-LN input)."""
        return self.self_attn_layer_norm(x) if self.normalize_before else x

    def forward(
        self,
        x: Tensor,
        encoder_out: Tensor,
        encoder_padding_mask: Optional[Tensor],
        self_attn_bias: Tensor,
        cross_attn_bias: Tensor,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        rows: Optional[Tensor] = None,
        need_attn: bool = False,
    ):
        """
        x: `(tgt_len, batch, embed_dim)`; encoder_out: `(src_len, batch, enc_dim)`;
        self/cross_attn_bias: broadcastable to `(batch, heads, tgt_len, tgt/src_len)`; `rows` as in
        :meth:`OFAAttention.forward` (early exiting computes a subset of the cached rows).
        Returns `(tgt_len, batch, embed_dim)` and head-averaged cross-attention weights or None.
        """
        x, _ = self._attention_block(
            x, self.self_attn_layer_norm, self.self_attn_ln,
            lambda h: self.self_attn(
                h, key_padding_mask=self_attn_padding_mask, attn_bias=self_attn_bias,
                attn_mask=self_attn_mask, incremental_state=incremental_state, rows=rows,
            ),
        )
        x, attn = self._attention_block(
            x, self.encoder_attn_layer_norm, self.cross_attn_ln,
            lambda h: self.encoder_attn(
                h, key=encoder_out, key_padding_mask=encoder_padding_mask,
                attn_bias=cross_attn_bias, incremental_state=incremental_state, rows=rows,
                need_weights=need_attn,
            ),
        )
        return self._ffn_block(x), attn
