"""OFA's label-smoothed cross-entropy (``adjust_label_smoothed_cross_entropy``) and MuE's
layer-wise task loss (paper §3.3, Eqs. 12–13) as an option of the same criterion.

Plain loss (as OFA's criterion)
-------------------------------
Per target token t with log-probabilities lp (log-softmax of the logits after constraint
masking):  loss_t = (1 - eps - eps_i) * nll_t + eps_i * smooth_t, with nll_t = -lp[y_t],
smooth_t = -Σ_v lp[v] over the allowed symbols v and eps_i = eps / (#allowed - 1):

* ``sample["constraint_masks"]`` (batch, tgt_len, vocab), True = allowed: disallowed
  *logits* are set to -inf before the log-softmax; the smoothing sum runs over the allowed
  symbols and #allowed is counted per token (OFA adds 1e-6 to that denominator; so do we);
* ``--constraint-range START,END``: logits of symbols 4..START-1 and END.. are set to -inf;
  the smoothing runs over {0,1,2,3} ∪ [START, END) (used when there are no constraint
  masks);
* neither: smoothing over the whole vocabulary, eps_i = eps / (vocab - 1).

``sample["conf"]`` (batch,), if present, multiplies each sample's log-probabilities.
Tokens whose target is pad are dropped, as are the first ``--ignore-prefix-size`` target
positions and, with ``--ignore-eos``, eos targets. With ``--drop-worst-ratio r`` and
``update_num > --drop-worst-after``, only the int(K·(1-r)) tokens with the smallest loss
are kept (OFA's topk over *tokens*). The loss and nll are sums; ``sample_size`` is the
number of tokens kept (batch size with ``--sentence-avg``).

Logging as OFA: ``loss`` and ``nll_loss`` are divided by ``sample_size`` (not by ln 2),
``ppl`` = 2^nll_loss, ``ntokens``/``nsentences``/``sample_size`` are summed, and with
``--report-accuracy`` ``accuracy`` = argmax over the (masked) distribution == target.

Differences from OFA's code, none of which changes a loss value: tokens are selected
with one boolean mask (same row-major order, so drop-worst picks the same tokens);
``--ignore-eos`` drops eos targets wherever they are instead of reshaping to
``tgt_len - 1`` (OFA's version needs exactly one eos per row); ``--report-accuracy``
works (OFA's ``compute_accuracy`` unpacks three values into two and raises). Not
supported: R-Drop (``--use-rdrop``: no OFA caption/SNLI-VE recipe uses it; refused with an
error) and OFA's pre-training list-of-two-samples input (refused).

Layer-wise task loss (MuE)
--------------------------
With ``--layerwise-loss`` the loss is the weighted mean over the N decoder layers of the
loss above computed on each layer's output (Eq. 12, L = 1/N Σ_i L_CE(i), L_CE as Eq. 13
plus OFA's label smoothing): layer i's output ``extra["inner_states"][i]`` goes through the
decoder's final layer norm and the shared output projection (``model.decoder.project``).
Layers 1..N-1 are projected in one batched call on the kept tokens only (stacked
hidden states, so pad/prompt positions never reach the vocabulary projection); the last
layer uses the model's own logits, so its term is exactly the plain loss.

* Averaged, not summed: the MuE authors' ``MuE_Task_Loss`` *sums* the N layer losses (and
  nll); we follow the paper's Eq. 12 and divide by N (weights sum to 1), so the loss scale
  matches the plain loss (with the same learning rate the MuE authors' gradients are N
  times larger).
* Each layer's term is the complete plain loss, including its own drop-worst selection
  (as in the MuE authors' code, which calls OFA's loss once per layer).
* ``--layer-weights w1,...,wN`` (non-negative, normalised to sum 1; default uniform)
  weights the layers; "0,...,0,1" gives exactly the plain loss.
* ``nll_loss`` is the same weighted mean of the per-layer nll; ``loss_layer1`` …
  ``loss_layerN`` (each layer's loss / sample_size) are logged.
* Without ``--layerwise-loss`` the loss is the plain last-layer loss: the paper's
  "w/o task loss" ablation, and OFA's behaviour.

Run scripts: ``--criterion adjust_label_smoothed_cross_entropy --layerwise-loss``.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

LAYER_LOSS_PREFIX = "loss_layer"


@dataclass
class AdjustLabelSmoothedCrossEntropyCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )
    report_accuracy: bool = field(default=False, metadata={"help": "report accuracy metric"})
    ignore_prefix_size: int = field(default=0, metadata={"help": "Ignore first N tokens"})
    ignore_eos: bool = field(default=False, metadata={"help": "Ignore eos token"})
    sentence_avg: bool = II("optimization.sentence_avg")
    drop_worst_ratio: float = field(
        default=0.0, metadata={"help": "ratio of the worst (highest-loss) target tokens to discard"}
    )
    drop_worst_after: int = field(
        default=0, metadata={"help": "discard the worst tokens only after this many updates"}
    )
    use_rdrop: bool = field(default=False, metadata={"help": "use R-Drop (not supported: refused)"})
    reg_alpha: float = field(default=1.0, metadata={"help": "weight for R-Drop (unused)"})
    sample_patch_num: int = field(
        default=196, metadata={"help": "sample patches for v1 (OFA pre-training; accepted, unused)"}
    )
    constraint_range: Optional[str] = field(
        default=None,
        metadata={"help": "constraint range 'START,END': only symbols 0-3 and START..END-1 are allowed"},
    )
    layerwise_loss: bool = field(
        default=False,
        metadata={"help": "MuE layer-wise task loss: mean of the loss of every decoder layer's output "
                  "(paper Eq. 12); off: the last layer's loss only ('w/o task loss')"},
    )
    layer_weights: Optional[str] = field(
        default=None,
        metadata={"help": "with --layerwise-loss: comma-separated non-negative weight per decoder layer, "
                  "normalised to sum 1 (default uniform)"},
    )


def mask_outside_range(logits, start: Optional[int], end: Optional[int]):
    """OFA's ``--constraint-range``: logits of symbols 4..start-1 and end.. become -inf
    (the 4 special symbols and [start, end) stay); unchanged without a range."""
    if start is None or end is None:
        return logits
    disallowed = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
    disallowed[4:start] = True
    disallowed[end:] = True
    return logits.masked_fill(disallowed, -math.inf)


def parse_constraint_range(constraint_range: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """``"START,END"`` → (START, END); None → (None, None)."""
    if constraint_range is None or str(constraint_range).strip() == "":
        return None, None
    parts = str(constraint_range).split(",")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--constraint-range must be 'START,END' (two integers), got {constraint_range!r}") from None
    if not 4 <= start <= end:
        raise ValueError(f"--constraint-range needs 4 <= START <= END, got {constraint_range!r}")
    return start, end


def parse_layer_weights(layer_weights: Optional[str]) -> Optional[List[float]]:
    """``"0,0,1"`` → [0.0, 0.0, 1.0] normalised to sum 1; None → None (uniform)."""
    if layer_weights is None or str(layer_weights).strip() == "":
        return None
    try:
        weights = [float(w) for w in str(layer_weights).split(",")]
    except ValueError:
        raise ValueError(f"--layer-weights must be comma-separated numbers, got {layer_weights!r}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--layer-weights must be finite, non-negative and not all zero, got {layer_weights!r}")
    total = sum(weights)
    return [w / total for w in weights]


def label_smoothed_nll_loss(
    lprobs, target, epsilon, update_num=0, drop_worst_ratio=0.0, drop_worst_after=0,
    constraint_masks=None, constraint_start=None, constraint_end=None,
):
    """OFA's token loss on the kept tokens.

    Args:
        lprobs: (K, vocab) log-probabilities of the K kept target tokens.
        target: (K,) their target ids.
        constraint_masks: (K, vocab) bool, True = allowed, or None.
    Returns:
        (loss sum, nll sum, number of tokens after drop-worst).
    """
    nll_loss = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    if constraint_masks is not None:
        smooth_loss = -lprobs.masked_fill(~constraint_masks, 0).sum(dim=-1)
        eps_i = epsilon / (constraint_masks.sum(1) - 1 + 1e-6)
    elif constraint_start is not None and constraint_end is not None:
        allowed = [0, 1, 2, 3] + list(range(constraint_start, constraint_end))
        smooth_loss = -lprobs[:, allowed].sum(dim=-1)
        eps_i = epsilon / (len(allowed) - 1 + 1e-6)
    else:
        smooth_loss = -lprobs.sum(dim=-1)
        eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
    if drop_worst_ratio > 0 and update_num > drop_worst_after:
        loss, indices = torch.topk(loss, k=int(loss.shape[0] * (1 - drop_worst_ratio)), largest=False)
        nll_loss = nll_loss[indices]
    return loss.sum(), nll_loss.sum(), loss.numel()


@register_criterion("adjust_label_smoothed_cross_entropy", dataclass=AdjustLabelSmoothedCrossEntropyCriterionConfig)
class AdjustLabelSmoothedCrossEntropyCriterion(FairseqCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        ignore_eos=False,
        report_accuracy=False,
        drop_worst_ratio=0.0,
        drop_worst_after=0,
        use_rdrop=False,
        reg_alpha=1.0,
        sample_patch_num=196,
        constraint_range=None,
        layerwise_loss=False,
        layer_weights=None,
    ):
        super().__init__(task)
        if use_rdrop:
            raise ValueError("--use-rdrop (R-Drop) is not supported by this re-implementation "
                             "(no OFA caption or SNLI-VE recipe uses it)")
        if not 0.0 <= drop_worst_ratio < 1.0:
            raise ValueError(f"--drop-worst-ratio must be in [0, 1), got {drop_worst_ratio}")
        if ignore_prefix_size < 0:
            raise ValueError(f"--ignore-prefix-size must be >= 0, got {ignore_prefix_size}")
        self.sentence_avg = sentence_avg
        self.eps = label_smoothing
        self.ignore_prefix_size = ignore_prefix_size
        self.ignore_eos = ignore_eos
        self.report_accuracy = report_accuracy
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after
        self.sample_patch_num = sample_patch_num
        self.constraint_start, self.constraint_end = parse_constraint_range(constraint_range)
        self.layerwise_loss = layerwise_loss
        self.layer_weights = parse_layer_weights(layer_weights)
        if self.layer_weights is not None and not layerwise_loss:
            raise ValueError("--layer-weights needs --layerwise-loss")

    # ------------------------------------------------------------------ forward
    def forward(self, model, sample, update_num=0, reduce=True):
        """Returns (loss, sample_size, logging_output); see the module docstring."""
        if isinstance(sample, list):
            raise ValueError("a list of samples (OFA pre-training v1/v2 batches) is not supported")
        net_output = model(**sample["net_input"])
        if self.layerwise_loss:
            loss, nll_loss, ntokens, layer_losses = self.compute_layerwise_loss(
                model, net_output, sample, update_num
            )
        else:
            loss, nll_loss, ntokens = self.compute_loss(model, net_output, sample, update_num, reduce=reduce)
            layer_losses = []
        sample_size = sample["target"].size(0) if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        for i, layer_loss in enumerate(layer_losses, 1):
            logging_output[f"{LAYER_LOSS_PREFIX}{i}"] = layer_loss.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    # ------------------------------------------------------------------ pieces
    def kept_tokens(self, model, net_output, sample):
        """(keep (batch, tgt_len) bool, target (batch, tgt_len)): the positions that get a loss."""
        target = model.get_targets(sample, net_output)
        keep = target.ne(self.padding_idx)
        if self.ignore_prefix_size > 0:
            keep[:, : self.ignore_prefix_size] = False
        if self.ignore_eos:
            keep &= target.ne(self.task.target_dictionary.eos())
        return keep, target

    def _selected_masks_and_conf(self, sample, keep):
        constraint_masks = sample.get("constraint_masks")
        if constraint_masks is not None:
            constraint_masks = constraint_masks[keep]
        conf = sample.get("conf")
        if conf is not None:
            conf = conf.to(keep.device).reshape(-1, 1).expand_as(keep)[keep]
        return constraint_masks, conf

    def normalized_lprobs(self, model, logits, constraint_masks=None, conf=None):
        """Log-probabilities (float32) of ``logits`` (..., K, vocab) after OFA's masking:
        disallowed logits (``constraint_masks`` (K, vocab) False, or outside the constraint
        range) are -inf before the log-softmax; ``conf`` (K,) scales the result."""
        if constraint_masks is not None:
            logits = logits.masked_fill(~constraint_masks, -math.inf)
        logits = mask_outside_range(logits, self.constraint_start, self.constraint_end)
        lprobs = model.get_normalized_probs((logits, None), log_probs=True)
        if conf is not None:
            lprobs = lprobs * conf.unsqueeze(-1).to(lprobs.dtype)
        return lprobs

    def _token_loss(self, lprobs, target, constraint_masks, update_num):
        return label_smoothed_nll_loss(
            lprobs, target, self.eps, update_num,
            drop_worst_ratio=self.drop_worst_ratio,
            drop_worst_after=self.drop_worst_after,
            constraint_masks=constraint_masks,
            constraint_start=self.constraint_start,
            constraint_end=self.constraint_end,
        )

    def get_lprobs_and_target(self, model, net_output, sample):
        """(lprobs (K, vocab), target (K,), constraint_masks (K, vocab) or None) of the kept
        tokens, from the model's (last layer's) logits."""
        keep, target = self.kept_tokens(model, net_output, sample)
        constraint_masks, conf = self._selected_masks_and_conf(sample, keep)
        lprobs = self.normalized_lprobs(model, net_output[0][keep], constraint_masks, conf)
        return lprobs, target[keep], constraint_masks

    def compute_loss(self, model, net_output, sample, update_num=0, reduce=True):
        """Plain (last-layer) loss: (loss sum, nll sum, ntokens)."""
        lprobs, target, constraint_masks = self.get_lprobs_and_target(model, net_output, sample)
        return self._token_loss(lprobs, target, constraint_masks, update_num)

    def compute_layerwise_loss(self, model, net_output, sample, update_num=0):
        """MuE layer-wise loss: (weighted mean loss, weighted mean nll, ntokens, [loss of
        layer 1..N]) — see the module docstring."""
        logits, extra = net_output[0], net_output[1]
        num_layers = model.decoder.num_layers
        states = extra.get("inner_states") if isinstance(extra, dict) else None
        if not states or len(states) != num_layers + 1:
            raise ValueError(
                f"--layerwise-loss needs the decoder's inner_states (input + {num_layers} layer outputs), "
                f"got {0 if not states else len(states)} (is early exiting switched on during training?)"
            )
        weights = self.layer_weights or [1.0 / num_layers] * num_layers
        if len(weights) != num_layers:
            raise ValueError(f"--layer-weights has {len(weights)} values for {num_layers} decoder layers")

        keep, target = self.kept_tokens(model, net_output, sample)
        target = target[keep]
        constraint_masks, conf = self._selected_masks_and_conf(sample, keep)
        per_layer_lprobs = []
        if num_layers > 1:
            # (N-1, tgt_len, batch, dim) → (N-1, batch, tgt_len, dim) → kept tokens (N-1, K, dim)
            hidden = torch.stack(states[1:num_layers], dim=0).transpose(1, 2)[:, keep]
            inner_lprobs = self.normalized_lprobs(model, model.decoder.project(hidden), constraint_masks, conf)
            per_layer_lprobs.extend(inner_lprobs.unbind(0))
        per_layer_lprobs.append(self.normalized_lprobs(model, logits[keep], constraint_masks, conf))

        loss = nll_loss = 0.0
        layer_losses, ntokens = [], 0
        for weight, lprobs in zip(weights, per_layer_lprobs):
            layer_loss, layer_nll, ntokens = self._token_loss(lprobs, target, constraint_masks, update_num)
            layer_losses.append(layer_loss)
            loss = loss + weight * layer_loss
            nll_loss = nll_loss + weight * layer_nll
        return loss, nll_loss, ntokens, layer_losses

    def compute_accuracy(self, model, net_output, sample):
        lprobs, target, _ = self.get_lprobs_and_target(model, net_output, sample)
        n_correct = lprobs.argmax(-1).eq(target).sum()
        return n_correct, torch.tensor(target.numel())

    # ------------------------------------------------------------------ logging
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs from data parallel training."""
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        nll_loss_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        nsentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)

        metrics.log_scalar("loss", loss_sum / sample_size, sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_loss_sum / sample_size, ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        layer_keys = sorted(
            {k for log in logging_outputs for k in log if k.startswith(LAYER_LOSS_PREFIX)},
            key=lambda k: int(k[len(LAYER_LOSS_PREFIX):]),
        )
        for key in layer_keys:
            layer_sum = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, layer_sum / sample_size, sample_size, round=3)
        metrics.log_scalar("ntokens", ntokens, 1, round=3)
        metrics.log_scalar("nsentences", nsentences, 1, round=3)
        metrics.log_scalar("sample_size", sample_size, 1, round=3)

        total = utils.item(sum(log.get("total", 0) for log in logging_outputs))
        if total > 0:
            metrics.log_scalar("total", total)
            n_correct = utils.item(sum(log.get("n_correct", 0) for log in logging_outputs))
            metrics.log_scalar("n_correct", n_correct)
            metrics.log_derived(
                "accuracy",
                lambda meters: round(meters["n_correct"].sum * 100.0 / meters["total"].sum, 3)
                if meters["total"].sum > 0
                else float("nan"),
            )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Logging outputs are sums, so workers' outputs can be summed before reduce_metrics."""
        return True
