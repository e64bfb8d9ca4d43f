"""Self-critical sequence training with a CIDEr-D reward (OFA's ``scst_reward_criterion``,
caption stage 2).

For a batch of B images:

1. **Candidates.** Beam search with the task's ``scst_generator`` (built by the caption
   task from ``--scst-args`` when ``--scst`` is set; if the task has none, one is built
   here with ``task.build_generator([model], Namespace(**json(--scst-args)))``), run with
   the model in eval mode and without gradients. All hypotheses of every image are kept
   (beam k → B·k candidates; every image must get the same number, k >= 2).
2. **Reward.** Candidates and references are decoded to text and normalised as OFA does
   (:func:`mue_fairseq.cider.scst_text`: punctuation removed, trailing "." dropped,
   " <eos>" appended); each candidate is scored by CIDEr-D against its image's references
   with document frequencies from ``--scst-cider-cached-tokens``; reward = score − mean
   score of the other k−1 candidates of the same image (leave-one-out baseline).
3. **Loss.** The candidates are teacher-forced (prev_output = [bos] + tokens[:-1], target
   = tokens, which end with eos) with each image's inputs repeated k times; loss =
   −Σ reward · log p(token) over the non-pad target tokens (after the first
   ``--ignore-prefix-size`` positions; ``--constraint-range`` masks logits as in the
   label-smoothed criterion). ``sample_size`` = number of those tokens, or the number of
   candidates with ``--sentence-avg``. Logged: loss, score (mean CIDEr-D of the
   candidates), ntokens, nsentences (candidates), sample_size.

What the batch must hold: ``net_input`` (src_tokens, src_lengths, patch_images,
patch_masks; every tensor in it except prev_output_tokens is repeated per candidate) and
``target``: the image's references as one token sequence, joined by ``&&`` (what
:class:`mue_fairseq.data.CaptionDataset` makes for SCST training, ``--scst``).

Differences from OFA's code: the loss forward runs in the mode the model was in when the
criterion was called (OFA forces ``model.train()``, so its validation loss ran in train
mode and updated batch-norm statistics); ``--ignore-prefix-size`` slices the time axis of
batch-major log-probabilities (OFA's slices the batch axis there; no OFA recipe sets it);
the reward has the log-probabilities' dtype (OFA: float64).
"""
import json
from argparse import Namespace
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from mue_fairseq.cider import REFERENCE_SEPARATOR, CiderD, leave_one_out_rewards, scst_text

from .label_smoothed_cross_entropy import mask_outside_range, parse_constraint_range


@dataclass
class ScstRewardCriterionConfig(FairseqDataclass):
    scst_cider_cached_tokens: str = field(
        default="coco-train-words.p",
        metadata={"help": "path to cached cPickle file used to calculate CIDEr scores "
                  "(make one with `python -m mue_fairseq.cider build-df`)"},
    )
    ignore_prefix_size: int = field(default=0, metadata={"help": "Ignore first N tokens"})
    sentence_avg: bool = II("optimization.sentence_avg")
    constraint_range: Optional[str] = field(
        default=None,
        metadata={"help": "constraint range 'START,END': only symbols 0-3 and START..END-1 are allowed"},
    )


def scst_loss(lprobs, target, reward):
    """−Σ reward · log p(target) over the given tokens.

    Args:
        lprobs: (K, vocab) log-probabilities of the K scored tokens.
        target: (K,) their ids.
        reward: (K,) the reward of each token's candidate.
    """
    return -(lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1) * reward).sum()


@register_criterion("scst_reward_criterion", dataclass=ScstRewardCriterionConfig)
class ScstRewardCriterion(FairseqCriterion):
    CIDER_REWARD_WEIGHT = 1

    def __init__(self, task, scst_cider_cached_tokens, sentence_avg, ignore_prefix_size=0, constraint_range=None):
        super().__init__(task)
        self.scst_cider_scorer = CiderD(scst_cider_cached_tokens)
        self.sentence_avg = sentence_avg
        if ignore_prefix_size < 0:
            raise ValueError(f"--ignore-prefix-size must be >= 0, got {ignore_prefix_size}")
        self.ignore_prefix_size = ignore_prefix_size
        self.constraint_start, self.constraint_end = parse_constraint_range(constraint_range)
        self._own_generator = None

    # ------------------------------------------------------------------ forward
    def forward(self, model, sample, update_num=0, reduce=True):
        loss, score, ntokens, nsentences = self.compute_loss(model, sample)
        sample_size = nsentences if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "score": score,
            "ntokens": ntokens,
            "nsentences": nsentences,
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def compute_loss(self, model, sample):
        gen_target, gen_res, gt_res = self.get_generator_out(model, sample)
        reward, scores = self.get_reward_and_scores(gen_res, gt_res, device=sample["target"].device)
        net_output, gen_target_tokens = self.get_net_output(model, sample, gen_target)
        keep = gen_target_tokens.ne(self.padding_idx)
        if self.ignore_prefix_size > 0:
            keep[:, : self.ignore_prefix_size] = False
        lprobs = self.normalized_lprobs(model, net_output[0][keep])
        token_reward = reward.to(lprobs.dtype).unsqueeze(1).expand_as(keep)[keep]
        loss = scst_loss(lprobs, gen_target_tokens[keep], token_reward)
        return loss, float(scores.sum()), int(keep.sum()), gen_target_tokens.size(0)

    # ------------------------------------------------------------------ candidates
    def scst_generator(self, model):
        generator = getattr(self.task, "scst_generator", None)
        if generator is not None:
            return generator
        if self._own_generator is None:
            cfg = getattr(self.task, "cfg", None)
            args = json.loads(getattr(cfg, "scst_args", None) or "{}")
            self._own_generator = self.task.build_generator([model], Namespace(**args))
        return self._own_generator

    def decode(self, tokens) -> str:
        """Ids → text: the task's ``decode`` if it has one, else OFA's (dictionary string,
        then BPE decode)."""
        decode = getattr(self.task, "decode", None)
        if callable(decode):
            return decode(tokens).strip()
        text = self.task.target_dictionary.string(tokens.int().cpu())
        return self.task.bpe.decode(text).strip()

    def references(self, sample) -> List[List[str]]:
        """The references of each image, decoded from the ``&&``-joined ``sample["target"]``."""
        refs = []
        for row in sample["target"]:
            refs.append(self.decode(row[row.ne(self.padding_idx)]).split(REFERENCE_SEPARATOR))
        return refs

    def get_generator_out(self, model, sample) -> Tuple[List[torch.Tensor], List[str], List[List[str]]]:
        """Beam search in eval mode: (candidate token tensors (B·k), their texts, references (B)).
        The model's train/eval mode is restored afterwards."""
        generator = self.scst_generator(model)
        was_training = model.training
        inner = getattr(generator, "model", None)
        inner_training = inner.training if isinstance(inner, torch.nn.Module) else None
        try:
            model.eval()
            if inner_training is not None:
                inner.eval()
            with torch.no_grad():
                # OFA's generator starts from BOS; fairseq's starts from EOS unless told
                gen_out = generator.generate([model], sample, bos_token=self.task.target_dictionary.bos())
        finally:
            if inner_training is not None:
                inner.train(inner_training)
            model.train(was_training)  # last: the wrapper may contain the model
        gen_target, gen_res = [], []
        for hypos in gen_out:
            for hypo in hypos:
                tokens = hypo["tokens"].long().cpu()
                gen_target.append(tokens)
                gen_res.append(self.decode(tokens))
        counts = {len(h) for h in gen_out}
        if len(counts) != 1:
            raise ValueError(f"SCST needs the same number of candidates per image, got {sorted(counts)}")
        return gen_target, gen_res, self.references(sample)

    # ------------------------------------------------------------------ reward
    def _calculate_eval_scores(self, gen_res: Sequence[str], gt_idx: Sequence[int], gt_res) -> np.ndarray:
        hyps = [scst_text(h) for h in gen_res]
        refs = [[scst_text(r) for r in refs] for refs in gt_res]
        return self.CIDER_REWARD_WEIGHT * self.scst_cider_scorer.scores(hyps, [refs[i] for i in gt_idx])

    def get_reward_and_scores(self, gen_res, gt_res, device):
        """(reward (B·k,) tensor, CIDEr-D scores (B·k,) array) with the leave-one-out baseline."""
        batch_size, n = len(gt_res), len(gen_res)
        if batch_size == 0 or n % batch_size:
            raise ValueError(f"{n} candidates for {batch_size} images")
        per_image = n // batch_size
        scores = self._calculate_eval_scores(gen_res, [i // per_image for i in range(n)], gt_res)
        reward = leave_one_out_rewards(scores, per_image)
        return torch.as_tensor(reward, device=device, dtype=torch.float64), scores

    # ------------------------------------------------------------------ teacher forcing
    def get_net_output(self, model, sample, gen_target):
        """Teacher-forced forward on the candidates: (net_output, target (B·k, L) right-padded)."""
        batch_size = sample["target"].size(0)
        per_image = len(gen_target) // batch_size
        device = sample["target"].device
        length = max(t.numel() for t in gen_target)
        target = torch.full((len(gen_target), length), self.padding_idx, dtype=torch.long)
        prev = torch.full_like(target, self.padding_idx)
        bos = self.task.target_dictionary.bos()
        for i, tokens in enumerate(gen_target):
            target[i, : tokens.numel()] = tokens
            prev[i, 0] = bos
            prev[i, 1 : tokens.numel()] = tokens[:-1]
        net_input = {}
        for key, value in sample["net_input"].items():
            if key == "prev_output_tokens":
                continue
            net_input[key] = (
                torch.repeat_interleave(value, per_image, dim=0) if torch.is_tensor(value) else value
            )
        net_input["prev_output_tokens"] = prev.to(device)
        return model(**net_input), target.to(device)

    def normalized_lprobs(self, model, logits):
        logits = mask_outside_range(logits, self.constraint_start, self.constraint_end)
        return model.get_normalized_probs((logits, None), log_probs=True)

    # ------------------------------------------------------------------ logging
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        score_sum = sum(log.get("score", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        nsentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss_sum / sample_size, sample_size, round=3)
        metrics.log_scalar("score", score_sum / nsentences, nsentences, round=3)
        metrics.log_scalar("ntokens", ntokens, 1, round=3)
        metrics.log_scalar("nsentences", nsentences, 1, round=3)
        metrics.log_scalar("sample_size", sample_size, 1, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
