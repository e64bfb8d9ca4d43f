"""Early-exit decisions (MuE §3.2, Eqs. 7-11, Algorithm 1) and the DeeBERT/PABEE/static baselines.

Everything here is tensor-in / tensor-out: no ``.item()``, no data-dependent Python control
flow, so decisions never force a host/device sync. Similarities are computed in float32
whatever the input dtype.

Conventions
-----------
* Encoder tensors are **batch-major**: ``(batch, seq_len, dim)`` with a padding mask
  ``(batch, seq_len)``, True = pad. fairseq layers are time-major ``(seq_len, batch, dim)``;
  pass ``x.transpose(0, 1)`` (a view, no copy).
* Layers are 1-based. "Exit at layer i" means layer i was computed and its output is used, as
  in Algorithm 1 (``x = Enc_i(x); if sim(prev, x) > theta: break``). For layer 1 the "previous"
  representation is the layer's input (the embeddings), see the note after Eq. 10.
* Comparisons are strict (``>`` for similarity, ``<`` for entropy), so a cosine threshold of
  1.0 never exits (cosines are clamped to [-1, 1]).
* The last layer always "exits"; callers stop there regardless of the decision.
"""

import math
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .config import ExitConfig

Step = Union[int, Tensor]

_EPS = 1e-12


def token_cosine(prev: Tensor, curr: Tensor) -> Tensor:
    """Cosine similarity (Eq. 7) along the last dimension, in float32.

    prev, curr: ``(..., dim)``; returns ``(...)`` float32 in [-1, 1]. The cosine with a zero
    vector is 0 (each norm is clamped to ``eps`` = 1e-12 in the denominator, so small but
    nonzero vectors are unaffected); rounding beyond [-1, 1] is clamped.
    """
    p, c = prev.float(), curr.float()
    dot = (p * c).sum(-1)
    p_norm = torch.linalg.vector_norm(p, dim=-1).clamp_min(_EPS)
    c_norm = torch.linalg.vector_norm(c, dim=-1).clamp_min(_EPS)
    return (dot / (p_norm * c_norm)).clamp(-1.0, 1.0)


def masked_mean_cosine(
    prev: Tensor, curr: Tensor, padding_mask: Optional[Tensor] = None
) -> Tensor:
    """Per-sample mean over non-pad tokens of the per-token cosine similarity (Eqs. 7-9).

    prev, curr: ``(batch, seq_len, dim)`` (batch-major); padding_mask: ``(batch, seq_len)``
    bool, True = pad, or None. Returns ``(batch,)`` float32. A sample with no valid token gets
    1.0 (nothing left to compute, so it exits).
    """
    cos = token_cosine(prev, curr)  # (batch, seq_len)
    if padding_mask is None:
        return cos.mean(-1) if cos.size(-1) > 0 else cos.new_ones(cos.shape[:-1])
    valid = (~padding_mask.bool()).to(cos.dtype)
    count = valid.sum(-1)
    mean = (cos * valid).sum(-1) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, torch.ones_like(mean))


def encoder_stream_exits(
    prev: Tensor, curr: Tensor, padding_mask: Optional[Tensor], threshold: float
) -> Tensor:
    """Whether each sample's stream (image or text) exits after the layer mapping prev -> curr.

    prev: the stream's input of layer i, curr: its output, ``(batch, seq_len, dim)``;
    padding_mask ``(batch, seq_len)`` True = pad. Returns bool ``(batch,)``:
    ``masked_mean_cosine(prev, curr, padding_mask) > threshold``. Samples that exited earlier
    must be kept exited by the caller (OR the masks over layers).
    """
    return masked_mean_cosine(prev, curr, padding_mask) > threshold


def threshold_at(step: Step, max_steps: Step, cfg: ExitConfig) -> Union[float, Tensor]:
    """Decoder similarity threshold Theta(t).

    Without ``decoder_threshold_decay``: the static ``cfg.decoder_exit_threshold``.
    With it (Eq. 11): ``Theta(t) = beta*theta + (1-beta)*exp(-tau*t/N)`` with
    theta = ``decay_theta``, beta = ``decay_beta``, tau = ``decay_tau``, where

    * ``t`` = ``step`` = index of the token being generated: 0 for the first generated token
      (the one predicted from BOS), i.e. fairseq SequenceGenerator's ``step``;
    * ``N`` = ``max_steps`` = the generation's maximum length for that batch (the generator's
      ``max_len``); values < 1 are treated as 1.

    So Theta(0) = beta*theta + 1 - beta (strictest) and it decreases monotonically towards
    beta*theta. ``step``/``max_steps`` may be ints (returns a float) or tensors (returns a
    float32 tensor broadcast over them, e.g. one step per row).
    """
    if not cfg.decoder_threshold_decay:
        theta = float(cfg.decoder_exit_threshold)
        if isinstance(step, Tensor) or isinstance(max_steps, Tensor):
            ref = step if isinstance(step, Tensor) else max_steps
            return torch.full(ref.shape, theta, dtype=torch.float32, device=ref.device)
        return theta
    beta, theta, tau = float(cfg.decay_beta), float(cfg.decay_theta), float(cfg.decay_tau)
    if isinstance(step, Tensor) or isinstance(max_steps, Tensor):
        ref = step if isinstance(step, Tensor) else max_steps
        t = torch.as_tensor(step, dtype=torch.float32, device=ref.device)
        n = torch.as_tensor(max_steps, dtype=torch.float32, device=ref.device).clamp_min(1.0)
        return beta * theta + (1.0 - beta) * torch.exp(-tau * t / n)
    return beta * theta + (1.0 - beta) * math.exp(-tau * step / max(max_steps, 1))


# --------------------------------------------------------------------------- decoder policies


class DecoderExitPolicy:
    """Per-token decoder exit rule.

    Usage by the generator, once per generation step (one token per row)::

        state = policy.start(num_rows, device)
        for layer in 1..N:
            h_out = decoder_layer(h_in)
            logits = output_projection(h_out) if policy.needs_logits else None
            exit = policy.decide(layer, h_in, h_out, logits, state, step, max_steps)
            ...  # rows with exit=True stop here (all rows stop at layer N);
            state = policy.select(state, keep)  # if the caller compacts to the active rows

    hidden_in / hidden_out: ``(num_rows, dim)``, the token's input and output of decoder layer
    ``layer`` (1-based); logits ``(num_rows, vocab)`` or None; returns bool ``(num_rows,)``.
    ``state`` is updated in place where a policy has one; ``select`` keeps the rows given by
    ``row_index`` (a LongTensor of row indices - preferred, no sync - or a bool mask).
    """

    needs_logits: bool = False

    def start(self, num_rows: int, device: Optional[torch.device] = None) -> Any:
        return None

    def select(self, state: Any, row_index: Tensor) -> Any:
        return state

    def decide(
        self,
        layer: int,
        hidden_in: Tensor,
        hidden_out: Tensor,
        logits: Optional[Tensor],
        state: Any,
        step: Step,
        max_steps: Step,
    ) -> Tensor:
        raise NotImplementedError


class NoExitPolicy(DecoderExitPolicy):
    """Never exits early: every token uses all decoder layers."""

    def decide(self, layer, hidden_in, hidden_out, logits, state, step, max_steps):
        return torch.zeros(hidden_out.size(0), dtype=torch.bool, device=hidden_out.device)


class SimilarityPolicy(DecoderExitPolicy):
    """MuE (Eq. 10, Algorithm 1): exit when cos(hidden_in, hidden_out) > Theta(step)."""

    def __init__(self, cfg: ExitConfig):
        self.cfg = cfg

    def decide(self, layer, hidden_in, hidden_out, logits, state, step, max_steps):
        return token_cosine(hidden_in, hidden_out) > threshold_at(step, max_steps, self.cfg)


class DeeBertPolicy(DecoderExitPolicy):
    """DeeBERT: exit when the entropy (nats) of softmax(logits) is < ``threshold``.

    ``logits`` may be raw scores or log-probabilities (softmax is shift invariant); -inf
    entries (masked tokens) contribute 0 to the entropy. Computed in float32.
    """

    needs_logits = True

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def decide(self, layer, hidden_in, hidden_out, logits, state, step, max_steps):
        if logits is None:
            raise ValueError("DeeBertPolicy needs the layer's logits")
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.special.entr(probs).sum(-1) < self.threshold


class PabeeState(NamedTuple):
    """Per-row PABEE state: previous layer's argmax (-1 before layer 1) and how many
    consecutive layers have repeated it. Both ``(num_rows,)`` long; updated in place."""

    prev_argmax: Tensor
    counter: Tensor


class PabeePolicy(DecoderExitPolicy):
    """PABEE (patience-based): exit at layer i when the argmax at layers i-patience..i is the
    same, i.e. the prediction equals the previous layer's ``patience`` times in a row (the
    original PABEE counter). Patience 2, argmaxes a, b, b, b -> exits at layer 4."""

    needs_logits = True

    def __init__(self, patience: int):
        self.patience = int(patience)

    def start(self, num_rows, device=None):
        return PabeeState(
            torch.full((num_rows,), -1, dtype=torch.long, device=device),
            torch.zeros(num_rows, dtype=torch.long, device=device),
        )

    def select(self, state, row_index):
        return PabeeState(state.prev_argmax[row_index], state.counter[row_index])

    def decide(self, layer, hidden_in, hidden_out, logits, state, step, max_steps):
        if logits is None:
            raise ValueError("PabeePolicy needs the layer's logits")
        pred = logits.argmax(-1)
        same = pred == state.prev_argmax
        state.counter.copy_(torch.where(same, state.counter + 1, torch.zeros_like(state.counter)))
        state.prev_argmax.copy_(pred)
        return state.counter >= self.patience


class StaticDepthPolicy(DecoderExitPolicy):
    """Every token exits at layer ``exit_layer`` (1-based)."""

    def __init__(self, exit_layer: int):
        self.exit_layer = int(exit_layer)

    def decide(self, layer, hidden_in, hidden_out, logits, state, step, max_steps):
        return torch.full(
            (hidden_out.size(0),),
            layer >= self.exit_layer,
            dtype=torch.bool,
            device=hidden_out.device,
        )


def build_decoder_policy(cfg: Any, num_layers: int) -> DecoderExitPolicy:
    """The decoder policy selected by ``cfg.decoder_exit_policy`` (cfg: ExitConfig or any
    config accepted by :meth:`ExitConfig.from_cfg`), validated against ``num_layers``."""
    cfg = ExitConfig.from_cfg(cfg).validate(num_decoder_layers=num_layers)
    name = cfg.policy_name
    if name == "none":
        return NoExitPolicy()
    if name == "similarity":
        return SimilarityPolicy(cfg)
    if name == "deebert":
        return DeeBertPolicy(cfg.deebert_entropy_threshold)
    if name == "pabee":
        return PabeePolicy(cfg.pabee_patience)
    return StaticDepthPolicy(cfg.static_exit_layer)
