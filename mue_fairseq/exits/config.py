"""Early-exit options (MuE §3.2, Appendix A) as a fairseq dataclass.

``ExitConfig`` is meant to be embedded in a task config, either as a nested field::

    @dataclass
    class SnliVeConfig(FairseqDataclass):
        ...
        exits: ExitConfig = field(default_factory=ExitConfig)

(fairseq flattens nested ``FairseqDataclass`` fields into the root CLI namespace, so the
options appear as ``--encoder-exit``, ``--decoder-exit-policy`` ... without a prefix), or by
inheriting from it. Either way the task sees an omegaconf ``DictConfig``, not an
``ExitConfig`` instance: call :meth:`ExitConfig.from_cfg` to get a real, validated one.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

DECODER_EXIT_POLICIES = ["none", "similarity", "deebert", "pabee", "static"]
DECODER_EXIT_POLICY_CHOICES = ChoiceEnum(DECODER_EXIT_POLICIES)


def _opt(name: str) -> str:
    """CLI spelling of a field name: ``image_exit_threshold`` -> ``--image-exit-threshold``."""
    return "--" + name.replace("_", "-")


@dataclass
class ExitConfig(FairseqDataclass):
    encoder_exit: bool = field(
        default=False,
        metadata={
            "help": "exit early in the encoder, separately for the image and the text stream "
            "(requires a model with modality decomposition, MuE §3.1)"
        },
    )
    image_exit_threshold: float = field(
        default=0.9,
        metadata={
            "help": "image stream exits after layer i when the mean cosine similarity of its "
            "tokens' input and output of layer i is > this (1.0 = never exit)"
        },
    )
    text_exit_threshold: float = field(
        default=0.95,
        metadata={"help": "like --image-exit-threshold, for the text stream"},
    )
    decoder_exit_policy: DECODER_EXIT_POLICY_CHOICES = field(
        default="none",
        metadata={
            "help": "decoder early-exit rule per generated token: none, similarity (MuE, "
            "cosine of a layer's input and output > threshold), deebert (entropy of the "
            "layer's prediction < threshold), pabee (prediction unchanged for --pabee-patience "
            "layers), static (always exit at --static-exit-layer)"
        },
    )
    decoder_exit_threshold: float = field(
        default=0.95,
        metadata={
            "help": "similarity threshold theta of the decoder without decay (1.0 = never exit)"
        },
    )
    decoder_threshold_decay: bool = field(
        default=False,
        metadata={
            "help": "decay the decoder similarity threshold over generation steps (Eq. 11): "
            "Theta(t) = beta*theta + (1-beta)*exp(-tau*t/N), with theta = --decay-theta"
        },
    )
    decay_theta: float = field(
        default=0.99, metadata={"help": "theta of the decaying threshold (Eq. 11)"}
    )
    decay_beta: float = field(
        default=0.95, metadata={"help": "beta of the decaying threshold (Eq. 11), in [0, 1]"}
    )
    decay_tau: float = field(
        default=1.0, metadata={"help": "tau of the decaying threshold (Eq. 11), > 0"}
    )
    deebert_entropy_threshold: float = field(
        default=0.5,
        metadata={
            "help": "DeeBERT: exit when the entropy (nats) of the layer's softmax prediction "
            "is < this (0 = never exit)"
        },
    )
    pabee_patience: int = field(
        default=2,
        metadata={
            "help": "PABEE: exit when the layer's argmax equals the previous layer's argmax "
            "this many times in a row"
        },
    )
    static_exit_layer: int = field(
        default=0,
        metadata={
            "help": "static policy: decoder layer (1-based) every token exits at; 0 = unset"
        },
    )
    exit_stats_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "where to write the exit statistics JSON (default: "
            "<subset>_exit_stats.json next to the predictions, i.e. in --results-path)"
        },
    )

    # ------------------------------------------------------------------ helpers

    @property
    def enabled(self) -> bool:
        """True when any early exit (encoder or decoder) is switched on."""
        return bool(self.encoder_exit) or self.policy_name != "none"

    @property
    def policy_name(self) -> str:
        """The decoder policy as a plain ``str`` (the field may hold fairseq's StrEnum)."""
        return str(getattr(self.decoder_exit_policy, "value", self.decoder_exit_policy))

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ExitConfig":
        """Build an ``ExitConfig`` from anything carrying its fields as attributes.

        Accepts an ``ExitConfig`` (returned as is), an omegaconf ``DictConfig`` or an
        ``argparse.Namespace``, either flat (task config inheriting the fields) or with the
        fields nested under ``exits``. Missing fields take their defaults.
        """
        if isinstance(cfg, ExitConfig):
            return cfg
        nested = getattr(cfg, "exits", None)
        if nested is not None and not isinstance(nested, (bool, int, float, str)):
            cfg = nested
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or not hasattr(cfg, f.name):
                continue
            value = getattr(cfg, f.name)
            if f.name == "decoder_exit_policy":
                value = str(getattr(value, "value", value))
            kwargs[f.name] = value
        return cls(**kwargs)

    def stats_path(self, results_path: Optional[str], subset: str = "test") -> Optional[str]:
        """Where to write the exit statistics: ``--exit-stats-path`` if given, else
        ``<results_path>/<subset>_exit_stats.json`` (beside OFA's ``<subset>_predict.json``);
        None when neither is known."""
        if self.exit_stats_path:
            return self.exit_stats_path
        if results_path:
            return os.path.join(results_path, f"{subset}_exit_stats.json")
        return None

    def validate(
        self,
        num_encoder_layers: Optional[int] = None,
        num_decoder_layers: Optional[int] = None,
    ) -> "ExitConfig":
        """Check the values; raise ``ValueError`` naming the offending CLI option.

        Cosine thresholds must lie in [-1, 1] (1.0 is valid and means "never exit", decisions
        use a strict ``>``), beta in [0, 1], tau > 0 and finite, the DeeBERT entropy threshold
        >= 0 and finite, patience >= 1, and with ``--decoder-exit-policy static`` the exit layer
        must be in 1..num_decoder_layers (>= 1 when the depth is not given). Layer counts only
        bound checks that need them. Returns ``self`` for chaining.
        """

        def in_range(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if not (lo <= v <= hi):  # also rejects NaN
                raise ValueError(f"{_opt(name)} must be in [{lo:g}, {hi:g}], got {v}")

        if self.policy_name not in DECODER_EXIT_POLICIES:
            raise ValueError(
                f"--decoder-exit-policy must be one of {DECODER_EXIT_POLICIES}, "
                f"got {self.policy_name!r}"
            )
        for name in (
            "image_exit_threshold",
            "text_exit_threshold",
            "decoder_exit_threshold",
            "decay_theta",
        ):
            in_range(name, -1.0, 1.0)
        in_range("decay_beta", 0.0, 1.0)
        if not (self.decay_tau > 0 and math.isfinite(self.decay_tau)):
            raise ValueError(f"--decay-tau must be > 0 and finite, got {self.decay_tau}")
        ent = self.deebert_entropy_threshold
        if not (ent >= 0 and math.isfinite(ent)):
            raise ValueError(f"--deebert-entropy-threshold must be >= 0 and finite, got {ent}")
        if self.pabee_patience < 1:
            raise ValueError(f"--pabee-patience must be >= 1, got {self.pabee_patience}")
        k = self.static_exit_layer
        if self.policy_name == "static":
            hi = num_decoder_layers
            if k < 1 or (hi is not None and k > hi):
                bound = f"1..{hi}" if hi is not None else ">= 1"
                raise ValueError(
                    f"--static-exit-layer must be in {bound} with --decoder-exit-policy "
                    f"static, got {k}"
                )
        elif k != 0:
            raise ValueError(
                f"--static-exit-layer is only used with --decoder-exit-policy static "
                f"(got {k} with policy {self.policy_name!r}); leave it at 0"
            )
        for name, n in (
            ("num_encoder_layers", num_encoder_layers),
            ("num_decoder_layers", num_decoder_layers),
        ):
            if n is not None and n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        return self
