"""Options of the OFA model (OFA's own flag names, so released checkpoints' saved configs and
OFA-style run scripts work unchanged) and the named architectures ofa_tiny … ofa_huge.

OFA's arch functions leave ``scale_attn``, ``scale_fc``, ``scale_heads`` and
``disable_entangle`` off although every released checkpoint and run script turns them on;
we keep that behaviour (the flags must be passed, as OFA's scripts do).
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import FairseqDataclass

from .layers import LayerConfig
from .resnet import RESNET_STAGES


@dataclass
class OFAConfig(FairseqDataclass):
    # Every default is None: the arch (ARCHITECTURES below) decides what is not given.
    activation_fn: Optional[str] = field(default=None, metadata={"help": "activation function of the FFNs"})
    dropout: Optional[float] = field(default=None, metadata={"help": "dropout probability"})
    attention_dropout: Optional[float] = field(default=None, metadata={"help": "dropout on attention weights"})
    activation_dropout: Optional[float] = field(default=None, metadata={"help": "dropout after the FFN activation"})
    relu_dropout: Optional[float] = field(default=None, metadata={"help": "alias of --activation-dropout"})
    encoder_embed_dim: Optional[int] = field(default=None, metadata={"help": "encoder width"})
    encoder_ffn_embed_dim: Optional[int] = field(default=None, metadata={"help": "encoder FFN width"})
    encoder_layers: Optional[int] = field(default=None, metadata={"help": "number of encoder layers"})
    encoder_attention_heads: Optional[int] = field(default=None, metadata={"help": "encoder attention heads"})
    encoder_normalize_before: Optional[bool] = field(default=None, metadata={"help": "pre-LN encoder layers"})
    decoder_embed_dim: Optional[int] = field(default=None, metadata={"help": "decoder width"})
    decoder_ffn_embed_dim: Optional[int] = field(default=None, metadata={"help": "decoder FFN width"})
    decoder_layers: Optional[int] = field(default=None, metadata={"help": "number of decoder layers"})
    decoder_attention_heads: Optional[int] = field(default=None, metadata={"help": "decoder attention heads"})
    decoder_normalize_before: Optional[bool] = field(default=None, metadata={"help": "pre-LN decoder layers"})
    share_decoder_input_output_embed: Optional[bool] = field(
        default=None, metadata={"help": "tie the decoder's input embedding and output projection"})
    share_all_embeddings: Optional[bool] = field(
        default=None, metadata={"help": "one embedding for encoder, decoder and output projection"})
    layernorm_embedding: Optional[bool] = field(default=None, metadata={"help": "layer norm on token embeddings"})
    no_scale_embedding: Optional[bool] = field(default=None, metadata={"help": "do not scale embeddings by sqrt(dim)"})
    patch_layernorm_embedding: Optional[bool] = field(default=None, metadata={"help": "layer norm on image patch embeddings"})
    code_layernorm_embedding: Optional[bool] = field(default=None, metadata={"help": "layer norm on image-code embeddings (decoder)"})
    add_type_embedding: Optional[bool] = field(default=None, metadata={"help": "add a text/image type embedding"})
    resnet_type: Optional[str] = field(default=None, metadata={"help": "image backbone: " + ", ".join(RESNET_STAGES)})
    resnet_drop_path_rate: Optional[float] = field(default=None, metadata={"help": "drop-path rate in the ResNet"})
    encoder_drop_path_rate: Optional[float] = field(default=None, metadata={"help": "drop-path rate of the last encoder layer (linear from 0)"})
    decoder_drop_path_rate: Optional[float] = field(default=None, metadata={"help": "drop-path rate of the last decoder layer (linear from 0)"})
    freeze_resnet: Optional[bool] = field(default=None, metadata={"help": "frozen batch norm in the ResNet"})
    sync_bn: Optional[bool] = field(default=None, metadata={"help": "synchronised batch norm (eps 1e-3, as OFA) in the ResNet"})
    freeze_encoder_embedding: Optional[bool] = field(default=None, metadata={"help": "do not train the encoder token embedding"})
    freeze_decoder_embedding: Optional[bool] = field(default=None, metadata={"help": "do not train the decoder token embedding"})
    token_bucket_size: Optional[int] = field(default=None, metadata={"help": "text relative-position buckets"})
    image_bucket_size: Optional[int] = field(default=None, metadata={"help": "side of the image position grid"})
    attn_scale_factor: Optional[float] = field(default=None, metadata={"help": "queries are scaled by (head_dim * factor)^-0.5"})
    code_image_size: Optional[int] = field(default=None, metadata={"help": "image-code grid size (image generation)"})
    entangle_position_embedding: Optional[bool] = field(default=None, metadata={"help": "also add positions to encoder inputs"})
    disable_entangle: Optional[bool] = field(default=None, metadata={"help": "do not add positions to decoder inputs"})
    scale_attn: Optional[bool] = field(default=None, metadata={"help": "NormFormer layer norm after attention"})
    scale_fc: Optional[bool] = field(default=None, metadata={"help": "NormFormer layer norm inside the FFN"})
    scale_heads: Optional[bool] = field(default=None, metadata={"help": "NormFormer learned per-head scales"})
    max_source_positions: Optional[int] = field(default=None, metadata={"help": "max source tokens"})
    max_target_positions: Optional[int] = field(default=None, metadata={"help": "max target tokens"})
    decompose_modalities: Optional[bool] = field(
        default=None, metadata={"help": "MuE: run image and text tokens through the encoder as two "
                                        "separate (weight-tied) streams, so each can exit on its own"})


# OFA features that exist as flags in its checkpoints but that this plugin does not implement;
# loading a config that turns one on fails with a clear message instead of a silent difference.
UNSUPPORTED_FLAGS = ("scale_resids", "interpolate_position", "encoder_prompt", "decoder_prompt", "adapter")

_LARGE = dict(
    encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_layers=12, encoder_attention_heads=16,
    decoder_layers=12, decoder_attention_heads=16, resnet_type="resnet152",
)
ARCHITECTURES = {
    "ofa_tiny": dict(encoder_embed_dim=256, encoder_ffn_embed_dim=1024, encoder_layers=4,
                     encoder_attention_heads=4, decoder_layers=4, decoder_attention_heads=4, resnet_type="resnet50"),
    "ofa_medium": dict(encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=4,
                       encoder_attention_heads=8, decoder_layers=4, decoder_attention_heads=8, resnet_type="resnet101"),
    "ofa_base": dict(encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_layers=6,
                     encoder_attention_heads=12, decoder_layers=6, decoder_attention_heads=12, resnet_type="resnet101"),
    "ofa_large": _LARGE,
    # not in OFA: ofa_base's depth (6 + 6, so exits have room) at a width and backbone that
    # train on a laptop CPU; used by the embedded procedural task (python -m mue_fairseq.demo)
    "ofa_demo": dict(encoder_embed_dim=128, encoder_ffn_embed_dim=512, encoder_layers=6,
                     encoder_attention_heads=4, decoder_layers=6, decoder_attention_heads=4,
                     resnet_type="resnet_light", scale_attn=True, scale_fc=True, scale_heads=True,
                     disable_entangle=True),
    "ofa_huge": dict(encoder_embed_dim=1280, encoder_ffn_embed_dim=5120, encoder_layers=24,
                     encoder_attention_heads=16, decoder_layers=12, decoder_attention_heads=16, resnet_type="resnet152"),
}
# OFA's large-arch defaults shared by every size
COMMON_DEFAULTS = dict(
    encoder_normalize_before=True, decoder_normalize_before=True, attention_dropout=0.0, relu_dropout=0.0,
    activation_dropout=0.0, dropout=0.0, max_source_positions=1024, max_target_positions=1024,
    share_decoder_input_output_embed=True, share_all_embeddings=True, no_scale_embedding=True,
    layernorm_embedding=True, activation_fn="gelu", resnet_drop_path_rate=0.0, encoder_drop_path_rate=0.0,
    decoder_drop_path_rate=0.0, token_bucket_size=256, image_bucket_size=42, freeze_encoder_embedding=False,
    freeze_decoder_embedding=False, add_type_embedding=True, attn_scale_factor=2, code_image_size=128,
    patch_layernorm_embedding=True, code_layernorm_embedding=True, entangle_position_embedding=False,
    disable_entangle=False, sync_bn=False, freeze_resnet=False, scale_attn=False, scale_fc=False,
    scale_heads=False, decompose_modalities=False,
)


def apply_architecture(args, arch: str) -> None:
    """Fill every option `args` lacks (absent or None) from the arch, as OFA's arch functions do."""
    def fill(name, value):
        if getattr(args, name, None) is None:
            setattr(args, name, value)

    for name, value in ARCHITECTURES[arch].items():
        fill(name, value)
    fill("decoder_embed_dim", args.encoder_embed_dim)
    fill("decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    for name, value in COMMON_DEFAULTS.items():
        fill(name, value)


def check_supported(args) -> None:
    on = [name for name in UNSUPPORTED_FLAGS if getattr(args, name, False)]
    if on:
        raise NotImplementedError(
            f"OFA option(s) {', '.join('--' + n.replace('_', '-') for n in on)} are not supported by mue_fairseq"
        )
    if args.resnet_type not in RESNET_STAGES:
        raise ValueError(f"--resnet-type {args.resnet_type!r} is not one of {sorted(RESNET_STAGES)}")


def layer_config(args, side: str, drop_path_rate: float = 0.0) -> LayerConfig:
    """Typed per-layer options of the encoder (side='encoder') or decoder."""
    activation_dropout = args.activation_dropout or getattr(args, "relu_dropout", 0.0) or 0.0
    return LayerConfig(
        embed_dim=getattr(args, f"{side}_embed_dim"),
        ffn_dim=getattr(args, f"{side}_ffn_embed_dim"),
        num_heads=getattr(args, f"{side}_attention_heads"),
        dropout=args.dropout,
        attention_dropout=args.attention_dropout,
        activation_dropout=activation_dropout,
        activation_fn=args.activation_fn,
        normalize_before=bool(getattr(args, f"{side}_normalize_before")),
        attn_scale_factor=args.attn_scale_factor,
        scale_attn=bool(args.scale_attn),
        scale_fc=bool(args.scale_fc),
        scale_heads=bool(args.scale_heads),
        drop_path_rate=drop_path_rate,
    )


OPTION_NAMES = tuple(f.name for f in fields(OFAConfig))
