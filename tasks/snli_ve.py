"""fairseq task ``snli_ve``: visual entailment, scored as OFA does (``snli_score``)."""
import json
import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import metrics
from fairseq.tasks import register_task

from mue_fairseq.data import SnliVeDataset, build_answer_trie
from mue_fairseq.data.collate import pad_1d, pad_2d_rows
from mue_fairseq.data.snli_ve import answer_constraint_mask

from .ofa_task import OFAConfig, OFATask, sum_logs

logger = logging.getLogger(__name__)


@dataclass
class SnliVeConfig(OFAConfig):
    ans2label_dict: Optional[str] = field(
        default='{"no": 0, "yes":1, "maybe": 2}',
        metadata={"help": "JSON answer → label dict; its keys, in order, are the candidate answers"},
    )
    add_caption: bool = field(
        default=False, metadata={"help": "put the premise text into the prompt as well"}
    )
    valid_batch_size: int = field(
        default=20, metadata={"help": "candidate answers scored per forward pass in validation"}
    )
    prompt_type: Optional[str] = field(
        default=None,
        metadata={"help": "where the prompt goes in the decoder: none (decoder starts at bos), "
                  "src (the whole source) or prev_output (source without eos; the released "
                  "checkpoints); unset means none"},
    )


@register_task("snli_ve", dataclass=SnliVeConfig)
class SnliVeTask(OFATask):
    """Attributes beyond OFATask: ``answers`` (candidates, in ``--ans2label-dict`` key order),
    ``index2ans``, ``answer_tokens`` (per answer, (A_k,) ids without bos/eos),
    ``constraint_trie`` (over ``[bos] + answer + [eos]``) and ``answer_masks`` (per answer,
    (A_k + 1, V) bool: allowed tokens at its answer and eos positions)."""

    dataset_class = SnliVeDataset

    def __init__(self, cfg: SnliVeConfig, src_dict, tgt_dict, bpe=None):
        super().__init__(cfg, src_dict, tgt_dict, bpe)
        try:
            self.ans2label_dict = json.loads(cfg.ans2label_dict)
        except json.JSONDecodeError as e:
            raise ValueError(f"--ans2label-dict is not valid JSON: {e}") from None
        self.answers: List[str] = list(self.ans2label_dict)
        self.index2ans = dict(enumerate(self.answers))
        self.constraint_trie, self.answer_tokens = build_answer_trie(self.answers, self.bpe, self.tgt_dict)
        bos, eos, vocab = self.tgt_dict.bos(), self.tgt_dict.eos(), len(self.tgt_dict)
        self.answer_masks = [
            answer_constraint_mask(self.constraint_trie, tokens.tolist() + [eos], bos, vocab)
            for tokens in self.answer_tokens
        ]

    def build_dataset(self, split, reader):
        cfg = self.cfg
        return SnliVeDataset(
            split, reader, self.bpe, self.tgt_dict,
            max_src_length=cfg.max_src_length,
            max_tgt_length=cfg.max_tgt_length,
            patch_image_size=cfg.patch_image_size,
            add_caption=cfg.add_caption,
            constraint_trie=self.constraint_trie,
            imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std,
            prompt_type=cfg.prompt_type,
        )

    # ------------------------------------------------------------------ validation
    def forward_candidates(self, model, net_input, repeats: int, prev_output_tokens):
        """Run the model on each sample ``repeats`` times, once per candidate.

        Tensors of ``net_input`` with batch size B along dim 0 are repeated (interleaved) to
        B * repeats; ``prev_output_tokens`` is (B * repeats, T). Returns the model's
        ``(logits (B * repeats, T, V), extra)``.
        """
        # exit-aware evaluation (MuE) hooks in here (lead).
        batch = net_input["src_tokens"].size(0)
        expanded = {}
        for key, value in net_input.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch:
                value = value.repeat_interleave(repeats, dim=0)
            expanded[key] = value
        expanded["prev_output_tokens"] = prev_output_tokens
        return model(**expanded)

    @torch.no_grad()
    def score_answers(self, model, sample) -> torch.Tensor:
        """(B, n_answers) log-probability of each candidate answer + eos after the sample's
        decoder prompt, under the trie constraint (OFA's SNLI-VE validation score)."""
        prompts = [p.cpu() for p in sample["decoder_prompts"]]
        device = sample["net_input"]["src_tokens"].device
        pad, eos = self.tgt_dict.pad(), self.tgt_dict.eos()
        eos_item = torch.tensor([eos])
        columns = []
        for start in range(0, len(self.answers), self.cfg.valid_batch_size):
            chunk = list(range(start, min(start + self.cfg.valid_batch_size, len(self.answers))))
            prev, target, masks, first_row, n_rows = [], [], [], [], []
            for prompt in prompts:
                for k in chunk:
                    prev.append(torch.cat([prompt, self.answer_tokens[k]]))
                    target.append(torch.cat([prompt[1:], self.answer_tokens[k], eos_item]))
                    masks.append(self.answer_masks[k])
                    first_row.append(prompt.numel() - 1)  # target row of the first answer token
                    n_rows.append(self.answer_masks[k].size(0))  # answer tokens + eos
            prev_tokens = pad_1d(prev, pad).to(device)
            target = pad_1d(target, pad).to(device)
            masks = pad_2d_rows(masks, True).to(device)  # (N, L, V), L = longest answer + 1
            n_rows = torch.tensor(n_rows, device=device)
            logits, extra = self.forward_candidates(model, sample["net_input"], len(chunk), prev_tokens)[:2]

            length = masks.size(1)
            steps = torch.arange(length, device=device)
            positions = (torch.tensor(first_row, device=device)[:, None] + steps).clamp(max=logits.size(1) - 1)
            rows = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.size(-1)))
            rows = rows.masked_fill(~masks, -math.inf)
            lprobs = model.get_normalized_probs((rows, extra), log_probs=True)
            token_scores = lprobs.gather(-1, target.gather(1, positions)[:, :, None]).squeeze(-1)
            token_scores = token_scores.masked_fill(steps[None, :] >= n_rows[:, None], 0.0)
            columns.append(token_scores.sum(1).view(len(prompts), len(chunk)).float())
        return torch.cat(columns, dim=1)

    def valid_step(self, sample, model, criterion, **kwargs):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        model.eval()
        scores = self.score_answers(model, sample)
        hyps = [self.index2ans[i] for i in scores.argmax(1).tolist()]
        hits = [ref.get(hyp, 0) for ref, hyp in zip(sample["ref_dict"], hyps)]
        logging_output["_snli_score_sum"] = sum(hits)
        logging_output["_snli_cnt"] = len(hits)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        count = sum_logs(logging_outputs, "_snli_cnt")
        if count > 0:
            metrics.log_scalar("_snli_score_sum", sum_logs(logging_outputs, "_snli_score_sum"))
            metrics.log_scalar("_snli_cnt", count)
            metrics.log_derived("snli_score", _snli_score)


def _snli_score(meters):
    score = meters["_snli_score_sum"].sum / meters["_snli_cnt"].sum
    return round(float(score), 4)
