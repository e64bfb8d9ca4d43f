"""Build tiny OFA models for tests (from OFA-style argument dicts) without any task files."""
import argparse
from types import SimpleNamespace

from fairseq.data import Dictionary

import mue_fairseq  # noqa: F401  (registers the model)
from fairseq.models import ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY


def dictionary_of(symbols):
    d = Dictionary()
    for s in symbols:
        if s not in d.indices:
            d.add_symbol(s)
    return d


def tiny_dictionary(n=100):
    return dictionary_of([f"tok{i}" for i in range(n)])


def build_ofa(args: dict, dictionary=None, arch="ofa_tiny"):
    """Build as fairseq does: Namespace -> arch function -> build_model."""
    dictionary = dictionary or tiny_dictionary()
    ns = argparse.Namespace(**{**args, "arch": args.get("arch", arch)})
    ARCH_CONFIG_REGISTRY[ns.arch](ns)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return ARCH_MODEL_REGISTRY[ns.arch].build_model(ns, task)


TINY_RELEASED = dict(
    encoder_embed_dim=32, decoder_embed_dim=32, encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    resnet_type="resnet50", add_type_embedding=True, code_layernorm_embedding=True, layernorm_embedding=True,
    patch_layernorm_embedding=True, scale_attn=True, scale_fc=True, scale_heads=True, share_all_embeddings=True,
    share_decoder_input_output_embed=True, disable_entangle=True, encoder_normalize_before=True,
    decoder_normalize_before=True, dropout=0.0, attention_dropout=0.0,
)
