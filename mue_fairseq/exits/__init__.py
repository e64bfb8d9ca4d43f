"""Early exiting (MuE §3.2): options, decision policies and cost accounting.

The model and the generator only call into this package.
"""

from .accounting import ExitRecord, ExitStats
from .config import DECODER_EXIT_POLICIES, ExitConfig
from .policies import (
    DecoderExitPolicy,
    DeeBertPolicy,
    NoExitPolicy,
    PabeePolicy,
    PabeeState,
    SimilarityPolicy,
    StaticDepthPolicy,
    build_decoder_policy,
    encoder_stream_exits,
    masked_mean_cosine,
    threshold_at,
    token_cosine,
)

__all__ = [
    "DECODER_EXIT_POLICIES",
    "DecoderExitPolicy",
    "DeeBertPolicy",
    "ExitConfig",
    "ExitRecord",
    "ExitStats",
    "NoExitPolicy",
    "PabeePolicy",
    "PabeeState",
    "SimilarityPolicy",
    "StaticDepthPolicy",
    "build_decoder_policy",
    "encoder_stream_exits",
    "masked_mean_cosine",
    "threshold_at",
    "token_cosine",
]
