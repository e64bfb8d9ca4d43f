"""Cost accounting for early exiting: per-sample records, expected time reduction (Eq. 14)
and a compute-weighted reduction.

Not on the hot path: the generator converts its per-batch exit tensors with ``.tolist()``
once per batch (see :meth:`ExitStats.add_batch`).

Cost model of :meth:`ExitStats.compute_weighted_reduction` (multiply-accumulates per token
per layer, d = ``embed_dim``, f = ``ffn_dim``):

* encoder layer: ``4d^2`` (q, k, v, out projections) + ``2 d f`` (FFN) + ``2 d L`` (attention
  scores and weighted sum over the L tokens the token attends to; L = its stream's length
  for the decomposed encoder, image + text tokens for a joint one);
* decoder layer: ``4d^2`` (self-attention projections) + ``2d^2`` (cross-attention q and out)
  + ``2 d f``;
* state propagation: ``2d^2`` per skipped layer (the k, v projections of the propagated
  state, so later tokens can attend to it).

Ignored, as equal for full and early-exited runs or small: the ResNet and embeddings, layer
norms, biases, decoder attention scores over the prefix / encoder output, the cross-attention
k/v projections of the encoder output, and the output projection to the vocabulary (note the
per-layer logits DeeBERT/PABEE need would cost ``d * vocab`` per layer; they are not counted).
The reduction is therefore of transformer-layer compute, ``1 - actual / full`` pooled over
the run, where "full" runs every layer on the same inputs.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

IntSeq = Union[Sequence[int], torch.Tensor]


@dataclass
class ExitRecord:
    """Exit behaviour of one sample.

    image_exit_layer / text_exit_layer: encoder layers the stream ran (1..N_E; N_E when it did
    not exit, and both equal for a joint encoder; 0 for a stream without tokens). image_tokens / text_tokens: non-pad tokens
    of each stream. decoder_exit_layers: one entry per generated token, the decoder layer it
    exited at (1..N_D). propagated_layers: per token, layers whose k/v were filled from the
    exited state (N_D - exit layer with propagation on); empty = none.
    """

    image_exit_layer: int
    text_exit_layer: int
    image_tokens: int
    text_tokens: int
    decoder_exit_layers: List[int] = field(default_factory=list)
    propagated_layers: List[int] = field(default_factory=list)
    sample_id: Optional[int] = None


def _to_list(x: IntSeq) -> List:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class ExitStats:
    """Aggregates :class:`ExitRecord` s over a run (and across workers with :meth:`merge`)."""

    def __init__(
        self,
        num_encoder_layers: int,
        num_decoder_layers: int,
        embed_dim: int,
        ffn_dim: int,
        decomposed_encoder: bool = True,
    ):
        self.num_encoder_layers = int(num_encoder_layers)
        self.num_decoder_layers = int(num_decoder_layers)
        self.embed_dim = int(embed_dim)
        self.ffn_dim = int(ffn_dim)
        self.decomposed_encoder = bool(decomposed_encoder)
        self.records: List[ExitRecord] = []
        self.wall_clock_seconds = 0.0

    # ------------------------------------------------------------------ collecting

    def add(self, record: ExitRecord) -> None:
        """Add one sample; raises ``ValueError`` on out-of-range layers."""
        n_e, n_d = self.num_encoder_layers, self.num_decoder_layers
        for name, tokens in (("image_exit_layer", record.image_tokens), ("text_exit_layer", record.text_tokens)):
            v = getattr(record, name)
            low = 0 if tokens == 0 else 1  # a stream with no tokens (e.g. no image) runs no layer
            if not low <= v <= n_e:
                raise ValueError(f"{name} must be in {low}..{n_e}, got {v}")
        if any(not 1 <= k <= n_d for k in record.decoder_exit_layers):
            raise ValueError(f"decoder exit layers must be in 1..{n_d}")
        p = record.propagated_layers
        if p and (
            len(p) != len(record.decoder_exit_layers)
            or any(not 0 <= x <= n_d - k for x, k in zip(p, record.decoder_exit_layers))
        ):
            raise ValueError("propagated_layers: one per token, each in 0..N_D - exit layer")
        self.records.append(record)

    def add_batch(
        self,
        image_exit_layers: IntSeq,
        text_exit_layers: IntSeq,
        image_tokens: IntSeq,
        text_tokens: IntSeq,
        decoder_exit_layers: Sequence[IntSeq],
        propagated_layers: Optional[Sequence[IntSeq]] = None,
        sample_ids: Optional[IntSeq] = None,
    ) -> None:
        """Add a batch: ``(batch,)`` tensors/lists per sample, and per sample a sequence of
        per-token decoder exit layers (and propagated layer counts) for its output tokens."""
        cols = [
            _to_list(x) for x in (image_exit_layers, text_exit_layers, image_tokens, text_tokens)
        ]
        ids = _to_list(sample_ids) if sample_ids is not None else [None] * len(cols[0])
        props = propagated_layers if propagated_layers is not None else [[]] * len(cols[0])
        for i, (img, txt, ni, nt) in enumerate(zip(*cols)):
            self.add(
                ExitRecord(
                    int(img), int(txt), int(ni), int(nt),
                    [int(k) for k in _to_list(decoder_exit_layers[i])],
                    [int(k) for k in _to_list(props[i])],
                    None if ids[i] is None else int(ids[i]),
                )
            )

    def add_wall_clock(self, seconds: float) -> None:
        """Add measured generation time (summed; after :meth:`merge`, worker-seconds)."""
        self.wall_clock_seconds += float(seconds)

    def merge(self, other: "ExitStats") -> "ExitStats":
        """Append another worker's records (same model dims) and add its wall clock."""
        if self._dims() != other._dims():
            raise ValueError(f"cannot merge ExitStats for {other._dims()} into {self._dims()}")
        self.records.extend(other.records)
        self.wall_clock_seconds += other.wall_clock_seconds
        return self

    def _dims(self) -> Dict[str, Any]:
        return {
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "embed_dim": self.embed_dim,
            "ffn_dim": self.ffn_dim,
            "decomposed_encoder": self.decomposed_encoder,
        }

    # ------------------------------------------------------------------ metrics

    @property
    def num_tokens(self) -> int:
        return sum(len(r.decoder_exit_layers) for r in self.records)

    def expected_time_reduction(self) -> Optional[float]:
        """Eq. 14: ``1 - (n_E/N_E + sum_tokens n_D / (num_tokens * N_D)) / 2``.

        Per sample n_E is the mean of the image and text exit layers (the decomposed encoder
        runs both streams; the paper defines n_E for one encoder); a stream without tokens
        (a sample without image) is left out of that mean. Over a run the encoder term
        averages the per-sample n_E/N_E, and the decoder term pools all generated tokens of all
        samples (the paper's word-weighted sum, Eq. 14's w_i). Without decoder tokens the
        decoder term is 1 (no reduction). None when no samples were added.
        """
        if not self.records:
            return None
        enc = sum(self._encoder_layers(r) for r in self.records)
        enc /= len(self.records) * self.num_encoder_layers
        n_tok = self.num_tokens
        dec = 1.0
        if n_tok:
            used = sum(sum(r.decoder_exit_layers) for r in self.records)
            dec = used / (n_tok * self.num_decoder_layers)
        return 1.0 - (enc + dec) / 2.0

    @staticmethod
    def _encoder_layers(r: ExitRecord) -> float:
        """n_E of one sample: the mean exit layer of the streams that hold tokens (a sample
        without image has only its text stream)."""
        used = [layers for layers, tokens in ((r.image_exit_layer, r.image_tokens),
                                              (r.text_exit_layer, r.text_tokens)) if tokens > 0]
        return sum(used) / len(used) if used else 0.0

    def layer_costs(self, stream_len: int) -> Dict[str, int]:
        """Per-token-per-layer MACs: ``enc`` (attending over ``stream_len`` tokens), ``dec``,
        ``kv`` (see the module docstring)."""
        d, f = self.embed_dim, self.ffn_dim
        return {
            "enc": 4 * d * d + 2 * d * f + 2 * d * stream_len,
            "dec": 6 * d * d + 2 * d * f,
            "kv": 2 * d * d,
        }

    def sample_costs(self, r: ExitRecord) -> Dict[str, int]:
        """``{"actual": MACs, "full": MACs}`` of one sample under the cost model."""
        n_e, n_d = self.num_encoder_layers, self.num_decoder_layers
        joint = r.image_tokens + r.text_tokens
        actual = full = 0
        streams = ((r.image_tokens, r.image_exit_layer), (r.text_tokens, r.text_exit_layer))
        for tokens, layers in streams:
            c = self.layer_costs(tokens if self.decomposed_encoder else joint)["enc"]
            actual += tokens * layers * c
            full += tokens * n_e * c
        c = self.layer_costs(0)
        actual += sum(r.decoder_exit_layers) * c["dec"] + sum(r.propagated_layers) * c["kv"]
        full += len(r.decoder_exit_layers) * n_d * c["dec"]
        return {"actual": actual, "full": full}

    def compute_weighted_reduction(self) -> Optional[float]:
        """``1 - sum(actual) / sum(full)`` over all samples; None when there is no compute."""
        actual = full = 0
        for r in self.records:
            c = self.sample_costs(r)
            actual += c["actual"]
            full += c["full"]
        return 1.0 - actual / full if full else None

    def summary(self) -> Dict[str, Any]:
        """Aggregate numbers. Histograms are lists indexed by ``layer - 1``."""
        n = len(self.records)
        n_tok = self.num_tokens
        img_hist = [0] * self.num_encoder_layers
        txt_hist = [0] * self.num_encoder_layers
        dec_hist = [0] * self.num_decoder_layers
        for r in self.records:
            img_hist[r.image_exit_layer - 1] += 1
            txt_hist[r.text_exit_layer - 1] += 1
            for k in r.decoder_exit_layers:
                dec_hist[k - 1] += 1

        def mean(total: float, count: int) -> Optional[float]:
            return total / count if count else None

        dec_used = sum(sum(r.decoder_exit_layers) for r in self.records)
        propagated = sum(sum(r.propagated_layers) for r in self.records)
        return {
            "num_samples": n,
            "num_tokens": n_tok,
            **self._dims(),
            "mean_image_exit_layer": mean(sum(r.image_exit_layer for r in self.records), n),
            "mean_text_exit_layer": mean(sum(r.text_exit_layer for r in self.records), n),
            "mean_decoder_exit_layer": mean(dec_used, n_tok),
            "mean_propagated_layers": mean(propagated, n_tok),
            "image_exit_histogram": img_hist,
            "text_exit_histogram": txt_hist,
            "decoder_exit_histogram": dec_hist,
            "expected_time_reduction": self.expected_time_reduction(),
            "compute_weighted_reduction": self.compute_weighted_reduction(),
            "wall_clock_seconds": self.wall_clock_seconds,
        }

    def format_summary(self) -> str:
        """A few human-readable lines for the end of generation."""
        s = self.summary()

        def num(v: Optional[float], fmt: str = "{:.2f}") -> str:
            return "n/a" if v is None else fmt.format(v)

        pct = "{:.1%}"
        return "\n".join(
            [
                f"| exits: {s['num_samples']} samples, {s['num_tokens']} generated tokens, "
                f"{s['wall_clock_seconds']:.2f}s wall clock",
                f"| encoder layers used (of {self.num_encoder_layers}; mean [count per layer]): "
                f"image "
                f"{num(s['mean_image_exit_layer'])} {s['image_exit_histogram']}, "
                f"text {num(s['mean_text_exit_layer'])} {s['text_exit_histogram']}",
                f"| decoder layers used (of {self.num_decoder_layers}): "
                f"{num(s['mean_decoder_exit_layer'])} {s['decoder_exit_histogram']}, "
                f"propagated {num(s['mean_propagated_layers'])}",
                f"| expected time reduction (Eq. 14) {num(s['expected_time_reduction'], pct)}, "
                f"compute-weighted reduction {num(s['compute_weighted_reduction'], pct)}",
            ]
        )

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> Dict[str, Any]:
        """Summary, model dims and per-sample records (JSON-serialisable)."""
        return {
            "summary": self.summary(),
            "dims": self._dims(),
            "wall_clock_seconds": self.wall_clock_seconds,
            "records": [asdict(r) for r in self.records],
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExitStats":
        stats = cls(**d["dims"])
        for r in d["records"]:
            stats.add(ExitRecord(**r))
        stats.wall_clock_seconds = float(d.get("wall_clock_seconds", 0.0))
        return stats

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_json(cls, path: str) -> "ExitStats":
        with open(path) as f:
            return cls.from_dict(json.load(f))
