"""OFA's unified encoder: image patches (ResNet features) and text tokens in one sequence
`[image; text]`, with absolute positions entering attention through a position bias and
per-layer relative-position tables (1-D for text, 2-D for image patches).

With ``decompose_modalities`` the two modalities run through the same (weight-tied) layers
as two separate streams (MuE, Eq. 3); each stream can then exit on its own (Eqs. 8–9), per
sample, and exited samples are dropped from the batch of the following layers.
"""
import math
from typing import Dict, List, Optional

import torch
from fairseq.models import FairseqEncoder
from fairseq.modules import LayerNorm
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

from ...exits.policies import masked_mean_cosine
from . import positions
from .layers import LayerConfig, OFAEncoderLayer
from .resnet import OUTPUT_CHANNELS, STRIDE, ResNetBackbone

IMAGE, TEXT = 1, 0  # values of the `modality` tensor and rows of `type_embedding`

# encoder_out entries whose batch dimension is 1 (time-major); all others have it first
_TIME_MAJOR = {"encoder_out", "encoder_states"}


class OFAEncoder(FairseqEncoder):
    def __init__(
        self,
        dictionary,
        embed_tokens: nn.Embedding,
        layer_cfg: LayerConfig,
        num_layers: int,
        backbone: ResNetBackbone,
        max_source_positions: int = 1024,
        token_bucket_size: int = 256,
        image_bucket_size: int = 42,
        layernorm_embedding: bool = True,
        patch_layernorm_embedding: bool = True,
        add_type_embedding: bool = True,
        entangle_position_embedding: bool = False,
        scale_embedding: bool = False,
        drop_path_rate: float = 0.0,
        decompose_modalities: bool = False,
    ):
        super().__init__(dictionary)
        self.register_buffer("version", torch.Tensor([3]))
        dim = embed_tokens.embedding_dim
        self.embed_dim = dim
        self.num_heads = layer_cfg.num_heads
        self.padding_idx = embed_tokens.padding_idx
        self.max_source_positions = max_source_positions
        self.image_bucket_size = image_bucket_size
        self.entangle_position_embedding = entangle_position_embedding
        self.decompose_modalities = decompose_modalities
        self.embed_scale = math.sqrt(dim) if scale_embedding else 1.0
        self.dropout_module = FairseqDropout(layer_cfg.dropout, module_name=self.__class__.__name__)

        self.embed_tokens = embed_tokens
        self.layernorm_embedding = LayerNorm(dim) if layernorm_embedding else None
        self.type_embedding = nn.Embedding(2, dim) if add_type_embedding else None
        self.embed_images = backbone
        self.image_proj = nn.Linear(OUTPUT_CHANNELS, dim)
        self.patch_layernorm_embedding = LayerNorm(dim) if patch_layernorm_embedding else None

        positions.add_position_tables(self, dim, layer_cfg.num_heads, num_layers, max_source_positions,
                                      token_bucket_size, image_bucket_size, layer_cfg.attn_scale_factor)
        self.pos_q_linear = nn.Linear(dim, dim)
        self.pos_k_linear = nn.Linear(dim, dim)

        rates = torch.linspace(0, drop_path_rate, num_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [self.build_encoder_layer(LayerConfig(**{**vars(layer_cfg), "drop_path_rate": r})) for r in rates]
        )
        self.num_layers = num_layers
        self.layer_norm = LayerNorm(dim) if layer_cfg.normalize_before else None

        # (image, text) similarity thresholds; set through OFAModel.set_exit_config
        self.exit_thresholds: Optional[tuple] = None
        # optional callback (stream name, layer, sample rows, similarities) for analysis
        self.similarity_observer = None

    def build_encoder_layer(self, cfg: LayerConfig) -> OFAEncoderLayer:
        return OFAEncoderLayer(cfg)

    # ------------------------------------------------------------------ inputs
    def embed_text(self, src_tokens: Tensor) -> Tensor:
        """`(batch, src_len)` tokens -> `(batch, src_len, embed_dim)`."""
        x = self.embed_scale * self.embed_tokens(src_tokens)
        if self.entangle_position_embedding:
            x = x + self.embed_positions(torch.arange(src_tokens.size(1), device=x.device))
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[TEXT]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x)

    def embed_image(self, patch_images: Tensor):
        """`(batch, 3, H, W)` -> patch embeddings `(batch, h*w, embed_dim)` and position ids `(h*w,)`."""
        features = self.embed_images(patch_images)
        height, width = features.shape[-2:]
        if height > self.image_bucket_size or width > self.image_bucket_size:
            limit = self.image_bucket_size * STRIDE
            raise ValueError(
                f"patch_images of {patch_images.shape[-2]}x{patch_images.shape[-1]} px give a "
                f"{height}x{width} patch grid, larger than the image position table "
                f"({self.image_bucket_size}x{self.image_bucket_size}); use --patch-image-size <= {limit}"
            )
        ids = positions.image_position_ids(height, width, self.image_bucket_size, device=features.device)
        x = self.embed_scale * self.image_proj(features.flatten(2).transpose(1, 2))
        if self.entangle_position_embedding:
            x = x + self.embed_image_positions(ids)
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[IMAGE]
        if self.patch_layernorm_embedding is not None:
            x = self.patch_layernorm_embedding(x)
        return self.dropout_module(x), ids

    def _check_inputs(self, src_tokens, patch_images, patch_masks):
        vocab = self.embed_tokens.num_embeddings
        if src_tokens.numel() and (src_tokens.min() < 0 or src_tokens.max() >= vocab):
            bad = src_tokens[(src_tokens < 0) | (src_tokens >= vocab)][0].item()
            raise ValueError(f"src_tokens holds id {bad}, outside the dictionary of {vocab} symbols")
        if src_tokens.size(1) > self.max_source_positions:
            raise ValueError(
                f"src_tokens has {src_tokens.size(1)} positions, more than --max-source-positions "
                f"{self.max_source_positions}"
            )
        if patch_images is None:
            return
        if patch_images.dim() != 4 or patch_images.size(1) != 3:
            raise ValueError(f"patch_images must be (batch, 3, H, W), got {tuple(patch_images.shape)}")
        if patch_images.size(0) != src_tokens.size(0):
            raise ValueError(
                f"patch_images has batch size {patch_images.size(0)} but src_tokens has {src_tokens.size(0)}"
            )
        if patch_masks is not None and patch_masks.shape != (src_tokens.size(0),):
            raise ValueError(
                f"patch_masks must have shape ({src_tokens.size(0)},) (one flag per sample), "
                f"got {tuple(patch_masks.shape)}"
            )

    # ------------------------------------------------------------------ position biases
    def _abs_position_bias(self, pos: Tensor, pos_k: Optional[Tensor] = None) -> Tensor:
        """(Normed) positions `(batch, len, dim)` -> bias `(batch, heads, len, len_k)`."""
        bsz = pos.size(0)
        pos_k = pos if pos_k is None else pos_k
        q = self.pos_q_linear(pos).view(bsz, pos.size(1), self.num_heads, -1).transpose(1, 2) * self.pos_scaling
        k = self.pos_k_linear(pos_k).view(bsz, pos_k.size(1), self.num_heads, -1).transpose(1, 2)
        return torch.matmul(q, k.transpose(2, 3))

    def _text_rel_bias(self, layer: int, length: int) -> Tensor:
        """`(1, heads, length, length)`."""
        return positions.relative_bias(self.token_rel_pos_table_list[layer], self.token_rp_bucket[:length, :length])

    def _image_rel_bias(self, layer: int, buckets: Tensor) -> Tensor:
        """`buckets` of the patch pairs (`image_rp_bucket[ids][:, ids]`) -> `(1, heads, n_patches, n_patches)`."""
        return positions.relative_bias(self.image_rel_pos_table_list[layer], buckets)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        patch_images: Optional[Tensor] = None,
        patch_masks: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        **unused,
    ) -> Dict[str, List[Tensor]]:
        """
        Args:
            src_tokens: `(batch, src_len)`, right-padded.
            patch_images: `(batch, 3, H, W)` or None (text only).
            patch_masks: `(batch,)` bool; False marks a sample without image (its patches are padding).
        Returns:
            fairseq's encoder dict: ``encoder_out`` `[(n_patches + src_len, batch, dim)]`,
            ``encoder_padding_mask`` `[(batch, n_patches + src_len)]`, ``position_embeddings``
            `[(batch, n_patches + src_len, dim)]` (normed; the decoder's cross-attention bias),
            ``modality`` `[(batch, n_patches + src_len)]` (1 image, 0 text), ``encoder_states``
            and, with exits, ``image_exit_layer``/``text_exit_layer`` `[(batch,)]`.
        """
        self._check_inputs(src_tokens, patch_images, patch_masks)
        bsz, src_len = src_tokens.shape
        text = self.embed_text(src_tokens)
        text_pad = src_tokens.eq(self.padding_idx)
        text_pos = self.pos_ln(self.embed_positions(torch.arange(src_len, device=src_tokens.device)))
        text_pos = text_pos.unsqueeze(0).expand(bsz, -1, -1)

        if patch_images is not None:
            image, image_ids = self.embed_image(patch_images)
            image_pad = text_pad.new_zeros(bsz, image.size(1))
            if patch_masks is not None:
                image_pad = image_pad | ~patch_masks.to(torch.bool)[:, None]
            image_pos = self.image_pos_ln(self.embed_image_positions(image_ids)).unsqueeze(0).expand(bsz, -1, -1)
        else:
            image = text.new_zeros(bsz, 0, self.embed_dim)
            image_pad = text_pad.new_zeros(bsz, 0)
            image_ids = src_tokens.new_zeros(0)
            image_pos = text_pos.new_zeros(bsz, 0, self.embed_dim)

        x = torch.cat([image, text], dim=1)
        padding_mask = torch.cat([image_pad, text_pad], dim=1)
        pos = torch.cat([image_pos, text_pos], dim=1)
        modality = torch.cat([image_pad.new_full(image_pad.shape, IMAGE, dtype=torch.long),
                              text_pad.new_full(text_pad.shape, TEXT, dtype=torch.long)], dim=1)
        has_pads = bool(padding_mask.any())
        if has_pads:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))

        out = {
            "encoder_padding_mask": [padding_mask],
            "encoder_embedding": [],
            "src_tokens": [],
            "src_lengths": [],
            "position_embeddings": [pos],
            "modality": [modality],
        }
        image_buckets = self.image_rp_bucket[image_ids][:, image_ids]
        if self.decompose_modalities:
            n_img = image.size(1)
            streams = [
                ("image", x[:, :n_img], image_pad, pos[:, :n_img], lambda i: self._image_rel_bias(i, image_buckets)),
                ("text", x[:, n_img:], text_pad, pos[:, n_img:], lambda i: self._text_rel_bias(i, src_len)),
            ]
            thresholds = self.exit_thresholds or (None, None)
            results = [self._run_stream(*stream, threshold=t) for stream, t in zip(streams, thresholds)]
            hidden = torch.cat([r[0] for r in results], dim=0)
            out["image_exit_layer"], out["text_exit_layer"] = [results[0][1]], [results[1][1]]
            out["encoder_states"] = []
        else:
            bias = self._abs_position_bias(pos[:1])  # positions are the same for every row
            n_img = image.size(1)
            states = [x.transpose(0, 1)] if return_all_hiddens else []
            hidden = x.transpose(0, 1)
            for i, layer in enumerate(self.layers):
                layer_bias = bias.clone()
                layer_bias[:, :, n_img:, n_img:] += self._text_rel_bias(i, src_len)
                if n_img:
                    layer_bias[:, :, :n_img, :n_img] += self._image_rel_bias(i, image_buckets)
                hidden = layer(hidden, padding_mask if has_pads else None, layer_bias)
                if return_all_hiddens:
                    states.append(hidden)
            out["encoder_states"] = states
        if self.layer_norm is not None:
            hidden = self.layer_norm(hidden)
        out["encoder_out"] = [hidden]
        return out

    def _run_stream(self, name: str, x: Tensor, pad: Tensor, pos: Tensor, rel_bias, threshold: Optional[float]):
        """Run one modality through the layers on its own, exiting per sample.

        x: `(batch, len, dim)`; pad: `(batch, len)`. Returns the stream's output
        `(len, batch, dim)` (before the final layer norm) and each sample's exit layer
        `(batch,)` (number of layers it used; 0 for a sample with no tokens in this stream).
        """
        bsz, length, _ = x.shape
        exit_layer = torch.full((bsz,), self.num_layers, dtype=torch.long, device=x.device)
        output = x.transpose(0, 1).clone()
        if length == 0:
            return output, exit_layer.zero_()
        empty = pad.all(dim=1)
        if threshold is not None:  # inference with exits: empty streams need no layer at all
            exit_layer[empty] = 0
            active = (~empty).nonzero().squeeze(1)
        else:  # an all-pad row would give NaN attention: let it attend to its (masked-out) pads
            pad = pad & ~empty[:, None]
            active = None
        bias = self._abs_position_bias(pos[:1])  # positions are the same for every row
        hidden = x.transpose(0, 1) if active is None else x.transpose(0, 1)[:, active]
        rows_pad = pad if active is None else pad[active]
        mask = rows_pad if bool(rows_pad.any()) else None
        for i, layer in enumerate(self.layers):
            if active is not None and active.numel() == 0:
                break
            new_hidden = layer(hidden, mask, bias + rel_bias(i))
            if threshold is not None:  # Eqs. 8-9: mean token cosine between the layer's input and output
                similarity = masked_mean_cosine(hidden.transpose(0, 1), new_hidden.transpose(0, 1), mask)
                if self.similarity_observer is not None:
                    self.similarity_observer(name, i + 1, active, similarity)
                exits = similarity > threshold
                if i + 1 < self.num_layers and bool(exits.any()):
                    done = active[exits]
                    output[:, done] = new_hidden[:, exits]
                    exit_layer[done] = i + 1
                    keep = ~exits
                    active, new_hidden = active[keep], new_hidden[:, keep]
                    if mask is not None:
                        rows_pad = rows_pad[keep]
                        mask = rows_pad if bool(rows_pad.any()) else None
            hidden = new_hidden
        if active is None:
            output = hidden
        elif active.numel():
            output[:, active] = hidden
        return output, exit_layer

    # ------------------------------------------------------------------ beam search
    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        """Select/reorder the batch rows of every entry (fairseq beam search)."""
        reordered = {}
        for key, values in encoder_out.items():
            dim = 1 if key in _TIME_MAJOR else 0
            reordered[key] = [v.index_select(dim, new_order) for v in values]
        return reordered

    def max_positions(self):
        return self.max_source_positions
