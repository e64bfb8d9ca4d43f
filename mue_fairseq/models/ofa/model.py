"""The OFA encoder-decoder, registered with fairseq as model ``ofa`` with the named
architectures ``ofa_tiny``, ``ofa_medium``, ``ofa_base``, ``ofa_large`` and ``ofa_huge``
(and the small ``ofa_demo`` for the embedded procedural task).

State-dict keys and shapes equal the original OFA implementation's, so released checkpoints
load strictly; call signatures are OFA's, so OFA-style code drives it.
"""
import logging
from typing import Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import FairseqEncoderDecoderModel, register_model, register_model_architecture
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from torch import Tensor, nn

from ...exits.config import ExitConfig
from ...exits.policies import build_decoder_policy
from . import config as C
from .decoder import OFADecoder
from .encoder import OFAEncoder
from .resnet import RESNET_STAGES, ResNetBackbone

logger = logging.getLogger(__name__)


@register_model("ofa")
class OFAModel(FairseqEncoderDecoderModel):
    def __init__(self, args, encoder: OFAEncoder, decoder: OFADecoder):
        super().__init__(encoder, decoder)
        self.args = args
        if not next(self.parameters()).is_meta:  # meta-device builds (shape checks) skip init
            self.apply(init_bert_params)  # OFA initialises as BERT does
        self.eos = encoder.dictionary.eos()

    @staticmethod
    def add_args(parser):
        gen_parser_from_dataclass(parser, C.OFAConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        arch = getattr(args, "arch", None) or getattr(args, "_name", None)
        C.apply_architecture(args, arch if arch in C.ARCHITECTURES else "ofa_large")
        C.check_supported(args)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        if args.share_all_embeddings and src_dict != tgt_dict:
            raise ValueError("--share-all-embeddings requires one dictionary for source and target")
        encoder_embed = nn.Embedding(len(src_dict), args.encoder_embed_dim, src_dict.pad())
        decoder_embed = (
            encoder_embed if args.share_all_embeddings
            else nn.Embedding(len(tgt_dict), args.decoder_embed_dim, tgt_dict.pad())
        )
        if args.freeze_encoder_embedding:
            encoder_embed.weight.requires_grad = False
        if args.freeze_decoder_embedding:
            decoder_embed.weight.requires_grad = False
        return cls(args, cls.build_encoder(args, src_dict, encoder_embed), cls.build_decoder(args, tgt_dict, decoder_embed))

    @classmethod
    def build_backbone(cls, args) -> ResNetBackbone:
        backbone = ResNetBackbone(RESNET_STAGES[args.resnet_type], frozen_bn=bool(args.freeze_resnet),
                                  drop_path_rate=args.resnet_drop_path_rate or 0.0)
        if args.sync_bn:
            for module in backbone.modules():  # OFA's synchronised batch norm uses eps 1e-3
                if isinstance(module, nn.BatchNorm2d):
                    module.eps = 1e-3
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
        return backbone

    @classmethod
    def build_encoder(cls, args, dictionary, embed_tokens) -> OFAEncoder:
        return OFAEncoder(
            dictionary, embed_tokens, C.layer_config(args, "encoder"), args.encoder_layers,
            cls.build_backbone(args),
            max_source_positions=args.max_source_positions,
            token_bucket_size=args.token_bucket_size,
            image_bucket_size=args.image_bucket_size,
            layernorm_embedding=bool(args.layernorm_embedding),
            patch_layernorm_embedding=bool(args.patch_layernorm_embedding),
            add_type_embedding=bool(args.add_type_embedding),
            entangle_position_embedding=bool(args.entangle_position_embedding),
            scale_embedding=not args.no_scale_embedding,
            drop_path_rate=args.encoder_drop_path_rate or 0.0,
            decompose_modalities=bool(args.decompose_modalities),
        )

    @classmethod
    def build_decoder(cls, args, dictionary, embed_tokens) -> OFADecoder:
        return OFADecoder(
            dictionary, embed_tokens, C.layer_config(args, "decoder"), args.decoder_layers,
            encoder_embed_dim=args.encoder_embed_dim,
            max_target_positions=args.max_target_positions,
            token_bucket_size=args.token_bucket_size,
            image_bucket_size=args.image_bucket_size,
            code_image_size=args.code_image_size,
            layernorm_embedding=bool(args.layernorm_embedding),
            code_layernorm_embedding=bool(args.code_layernorm_embedding),
            disable_entangle=bool(args.disable_entangle),
            scale_embedding=not args.no_scale_embedding,
            drop_path_rate=args.decoder_drop_path_rate or 0.0,
            share_input_output_embed=bool(args.share_decoder_input_output_embed or args.share_all_embeddings),
        )

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Tensor,
        prev_output_tokens: Tensor,
        patch_images: Optional[Tensor] = None,
        patch_masks: Optional[Tensor] = None,
        features_only: bool = False,
        return_all_hiddens: bool = False,
        alignment_layer: Optional[int] = None,
        **unused,
    ):
        """Teacher-forced forward: returns logits `(batch, tgt_len, vocab)` and the decoder's extras."""
        encoder_out = self.encoder(src_tokens, src_lengths, patch_images=patch_images, patch_masks=patch_masks,
                                   return_all_hiddens=return_all_hiddens)
        return self.decoder(prev_output_tokens, encoder_out=encoder_out, features_only=features_only,
                            alignment_layer=alignment_layer, return_all_hiddens=return_all_hiddens)

    # ------------------------------------------------------------------ MuE
    def set_exit_config(self, cfg: Optional[ExitConfig], max_len: Optional[int] = None) -> None:
        """Switch early exiting on (per `cfg`) or off (None). Validates the options first.

        Encoder exits need ``--decompose-modalities`` (the model option it was trained with).
        """
        if cfg is None or not cfg.enabled:
            self.encoder.exit_thresholds = None
            self.decoder.exit_policy = None
            return
        cfg = ExitConfig.from_cfg(cfg).validate(self.encoder.num_layers, self.decoder.num_layers)
        if cfg.encoder_exit:
            if not self.encoder.decompose_modalities:
                raise ValueError("--encoder-exit needs a model with --decompose-modalities")
            self.encoder.exit_thresholds = (cfg.image_exit_threshold, cfg.text_exit_threshold)
        else:
            self.encoder.exit_thresholds = None
        policy = build_decoder_policy(cfg, self.decoder.num_layers)
        self.decoder.exit_policy = None if cfg.policy_name == "none" else policy
        self.decoder.exit_max_len = max_len

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        # OFA checkpoints carry decoder.image_position_idx computed for their code size; OFA
        # always overwrites it with the model's own (and so do we)
        key = prefix + "decoder.image_position_idx"
        if key in state_dict:
            state_dict[key] = self.decoder.image_position_idx.clone()


def _register(name: str, preset: Optional[dict] = None):
    def arch(args):
        for key, value in (preset or {}).items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        C.apply_architecture(args, name if name in C.ARCHITECTURES else "ofa_large")

    register_model_architecture("ofa", name)(arch)


for _name in C.ARCHITECTURES:
    _register(_name)
