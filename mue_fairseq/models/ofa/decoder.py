"""OFA's decoder: token embeddings (plus absolute positions unless ``disable_entangle``),
self-attention with an absolute + relative position bias, cross-attention with a position
bias against the encoder's positions, a final layer norm and the shared output projection.

During incremental generation with an exit policy set (MuE, Eq. 10), each token stops at the
first layer whose policy says so; rows that stopped are dropped from the following layers'
attention/FFN, and their exited hidden state is propagated to those layers' self-attention
key/value cache so later tokens that go deeper find every earlier position there.
"""
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from fairseq import utils
from fairseq.models import FairseqIncrementalDecoder
from fairseq.modules import LayerNorm
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

from ...exits.policies import token_cosine
from . import positions
from .attention import IncrementalState
from .layers import LayerConfig, OFADecoderLayer


class OFADecoder(FairseqIncrementalDecoder):
    def __init__(
        self,
        dictionary,
        embed_tokens: nn.Embedding,
        layer_cfg: LayerConfig,
        num_layers: int,
        encoder_embed_dim: int,
        max_target_positions: int = 1024,
        token_bucket_size: int = 256,
        image_bucket_size: int = 42,
        code_image_size: int = 128,
        layernorm_embedding: bool = True,
        code_layernorm_embedding: bool = True,
        disable_entangle: bool = False,
        scale_embedding: bool = False,
        drop_path_rate: float = 0.0,
        share_input_output_embed: bool = True,
    ):
        super().__init__(dictionary)
        self.register_buffer("version", torch.Tensor([3]))
        dim = layer_cfg.embed_dim
        self.embed_dim = dim
        self.num_heads = layer_cfg.num_heads
        self.padding_idx = embed_tokens.padding_idx
        self.max_target_positions = max_target_positions
        self.disable_entangle = disable_entangle
        self.embed_scale = math.sqrt(dim) if scale_embedding else 1.0
        self.dropout_module = FairseqDropout(layer_cfg.dropout, module_name=self.__class__.__name__)

        self.embed_tokens = embed_tokens
        self.layernorm_embedding = LayerNorm(dim) if layernorm_embedding else None
        # the image positions / code layer norm serve OFA's image-generation tasks; kept so
        # OFA checkpoints load strictly
        positions.add_position_tables(self, dim, layer_cfg.num_heads, num_layers, max_target_positions,
                                      token_bucket_size, image_bucket_size, layer_cfg.attn_scale_factor)
        self.self_pos_q_linear = nn.Linear(dim, dim)
        self.self_pos_k_linear = nn.Linear(dim, dim)
        self.cross_pos_q_linear = nn.Linear(dim, dim)
        self.cross_pos_k_linear = nn.Linear(dim, dim)
        self.code_layernorm_embedding = LayerNorm(dim) if code_layernorm_embedding else None

        rates = torch.linspace(0, drop_path_rate, num_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [self.build_decoder_layer(LayerConfig(**{**vars(layer_cfg), "drop_path_rate": r}), encoder_embed_dim)
             for r in rates]
        )
        self.num_layers = num_layers
        self.layer_norm = LayerNorm(dim) if layer_cfg.normalize_before else None

        if share_input_output_embed:
            self.output_projection = nn.Linear(dim, embed_tokens.num_embeddings, bias=False)
            self.output_projection.weight = embed_tokens.weight
        else:
            self.output_projection = nn.Linear(dim, len(dictionary), bias=False)
            nn.init.normal_(self.output_projection.weight, mean=0, std=dim**-0.5)

        self.register_buffer(
            "image_position_idx", positions.decoder_image_position_ids(code_image_size // 8, image_bucket_size)
        )
        # MuE: a policy from mue_fairseq.exits (None = full depth) and an optional observer
        # called with (sample ids, exit layers) after each generated token
        self.exit_policy = None
        self.exit_max_len: Optional[int] = None  # N of Eq. 11, set by the generator
        self.exit_observer: Optional[Callable[[Tensor, Tensor], Any]] = None
        # optional callback ("decoder", layer, rows, token similarities) for analysis
        self.similarity_observer = None

    def build_decoder_layer(self, cfg: LayerConfig, encoder_embed_dim: int) -> OFADecoderLayer:
        return OFADecoderLayer(cfg, encoder_embed_dim)

    # ------------------------------------------------------------------ position biases
    def _position_biases(self, tgt_len: int, encoder_pos: Tensor, last_only: bool):
        """Absolute position biases of target positions 0..tgt_len-1 (only the last one as
        query when `last_only`): self `(1, heads, q_len, tgt_len)` and cross
        `(1, heads, q_len, src_len)`, plus the raw position embeddings of the queries.

        The encoder's position embeddings are the same for every row of a batch (image grid
        positions, then text positions 0..src_len-1; padding is masked, not re-positioned), so
        the cross bias is computed once and broadcast over the batch."""
        device = encoder_pos.device
        raw = self.embed_positions(torch.arange(tgt_len, device=device))  # (tgt_len, dim)
        normed = self.pos_ln(raw)
        queries = normed[-1:] if last_only else normed

        def heads(t):
            return t.view(t.size(0), self.num_heads, -1).transpose(0, 1)  # (heads, len, head_dim)

        q_self = heads(self.self_pos_q_linear(queries)) * self.pos_scaling
        k_self = heads(self.self_pos_k_linear(normed))
        self_bias = torch.matmul(q_self, k_self.transpose(1, 2)).unsqueeze(0)
        q_cross = heads(self.cross_pos_q_linear(queries)) * self.pos_scaling
        k_cross = heads(self.cross_pos_k_linear(encoder_pos[0]))
        cross_bias = torch.matmul(q_cross, k_cross.transpose(1, 2)).unsqueeze(0)
        return self_bias, cross_bias, raw[-1:] if last_only else raw

    def _rel_bias(self, layer: int, tgt_len: int, last_only: bool) -> Tensor:
        """`(1, heads, q_len, tgt_len)`."""
        buckets = self.token_rp_bucket[:tgt_len, :tgt_len]
        if last_only:
            buckets = buckets[-1:]
        return positions.relative_bias(self.token_rel_pos_table_list[layer], buckets)

    def embed(self, tokens: Tensor, raw_positions: Tensor) -> Tensor:
        """`(batch, len)` tokens -> `(len, batch, dim)` layer input."""
        x = self.embed_scale * self.embed_tokens(tokens)
        if not self.disable_entangle:
            x = x + raw_positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x).transpose(0, 1)

    def project(self, hidden: Tensor) -> Tensor:
        """Final layer norm and shared output projection: `(..., dim)` -> `(..., vocab)`."""
        if self.layer_norm is not None:
            hidden = self.layer_norm(hidden)
        return self.output_projection(hidden)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[Dict[str, List[Tensor]]] = None,
        incremental_state: Optional[IncrementalState] = None,
        features_only: bool = False,
        alignment_layer: Optional[int] = None,
        return_all_hiddens: bool = False,
        **unused,
    ):
        """
        Args:
            prev_output_tokens: `(batch, tgt_len)`, starting with BOS; with `incremental_state`
                the whole prefix, of which only the last position is computed.
            encoder_out: the encoder's output dict.
        Returns:
            logits `(batch, tgt_len or 1, vocab)` (features before the output projection if
            `features_only`) and ``{"attn": [cross-attention of the last layer or None],
            "inner_states": [layer input, each layer's output], each (tgt_len, batch, dim)}``.
        """
        vocab = self.embed_tokens.num_embeddings
        if prev_output_tokens.numel() and (prev_output_tokens.min() < 0 or prev_output_tokens.max() >= vocab):
            raise ValueError(f"prev_output_tokens holds ids outside the dictionary of {vocab} symbols")
        if incremental_state is not None and self.exit_policy is not None:
            return self._forward_step_with_exits(prev_output_tokens, encoder_out, incremental_state, features_only)

        bsz, tgt_len = prev_output_tokens.shape
        incremental = incremental_state is not None
        enc = encoder_out["encoder_out"][0]
        enc_pad = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        self_bias, cross_bias, raw_pos = self._position_biases(
            tgt_len, encoder_out["position_embeddings"][0], last_only=incremental
        )
        tokens = prev_output_tokens[:, -1:] if incremental else prev_output_tokens
        x = self.embed(tokens, raw_pos)
        pad_mask = tokens.eq(self.padding_idx)
        pad_mask = pad_mask if bool(pad_mask.any()) else None
        causal = None if incremental else self._future_mask(tgt_len, x)
        alignment_layer = self.num_layers - 1 if alignment_layer is None else alignment_layer

        inner_states, attn = [x], None
        for i, layer in enumerate(self.layers):
            x, layer_attn = layer(
                x, enc, enc_pad,
                self_attn_bias=self_bias + self._rel_bias(i, tgt_len, incremental),
                cross_attn_bias=cross_bias,
                self_attn_mask=causal,
                self_attn_padding_mask=pad_mask,
                incremental_state=incremental_state,
                need_attn=i == alignment_layer,
            )
            inner_states.append(x)
            if i == alignment_layer:
                attn = layer_attn
        if incremental and self.exit_observer is not None:
            self.exit_observer(encoder_out, x.new_full((bsz,), self.num_layers, dtype=torch.long))
        features = x.transpose(0, 1)
        out = features if features_only else self.project(features)
        return out, {"attn": [attn], "inner_states": inner_states}

    def _future_mask(self, length: int, like: Tensor) -> Tensor:
        return torch.triu(utils.fill_with_neg_inf(torch.zeros(length, length)), 1).to(like)

    # ------------------------------------------------------------------ MuE decoding step
    def _forward_step_with_exits(self, prev_output_tokens, encoder_out, incremental_state, features_only):
        """One generation step in which every row (hypothesis) exits at its own layer."""
        bsz, tgt_len = prev_output_tokens.shape
        step = tgt_len - 1  # t of Eq. 11: 0 for the first generated token
        enc = encoder_out["encoder_out"][0]
        enc_pad = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        self_bias, cross_bias, raw_pos = self._position_biases(
            tgt_len, encoder_out["position_embeddings"][0], last_only=True
        )
        tokens = prev_output_tokens[:, -1:]
        x = self.embed(tokens, raw_pos)  # (1, bsz, dim)
        pad_mask = tokens.eq(self.padding_idx)
        pad_mask = pad_mask if bool(pad_mask.any()) else None

        policy = self.exit_policy
        state = policy.start(bsz, x.device)
        active = torch.arange(bsz, device=x.device)
        exit_layer = torch.full((bsz,), self.num_layers, dtype=torch.long, device=x.device)
        # layer input of every row: a row that exited keeps feeding its exited state to the
        # key/value projections of the layers it skips (state propagation)
        layer_input = x
        final = x.new_empty(x.shape)
        hidden = x
        rows_enc_pad = enc_pad
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(layer.self_attn_input(layer_input))
            layer.self_attn.append_kv(incremental_state, k, v, pad_mask)
            out, _ = layer(
                hidden, enc, rows_enc_pad,
                self_attn_bias=self_bias + self._rel_bias(i, tgt_len, True),
                cross_attn_bias=cross_bias,
                incremental_state=incremental_state,
                rows=active,
            )
            if self.similarity_observer is not None:
                self.similarity_observer("decoder", i + 1, active, token_cosine(hidden[0], out[0]))
            if i + 1 == self.num_layers:
                final[:, active] = out
                break
            logits = self.project(out[0]) if policy.needs_logits else None
            exits = policy.decide(i + 1, hidden[0], out[0], logits, state, step, self.exit_max_len)
            if bool(exits.any()):
                done = active[exits]
                final[:, done] = out[:, exits]
                exit_layer[done] = i + 1
                layer_input = layer_input.index_copy(1, done, out[:, exits])
                keep = ~exits
                active, out, state = active[keep], out[:, keep], policy.select(state, keep)
                if enc_pad is not None:
                    rows_enc_pad = enc_pad.index_select(0, active)
                if active.numel() == 0:
                    # every row exited: the remaining layers still need this position's keys/values
                    for later in self.layers[i + 1:]:
                        k, v = later.self_attn.project_kv(later.self_attn_input(layer_input))
                        later.self_attn.append_kv(incremental_state, k, v, pad_mask)
                    break
            layer_input = layer_input.index_copy(1, active, out) if active.numel() < bsz else out
            hidden = out
        if self.exit_observer is not None:
            self.exit_observer(encoder_out, exit_layer)
        features = final.transpose(0, 1)
        out = features if features_only else self.project(features)
        return out, {"attn": [None], "inner_states": [], "exit_layer": exit_layer}

    def max_positions(self):
        return self.max_target_positions
