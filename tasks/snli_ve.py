"""fairseq task ``snli_ve``: visual entailment, scored as OFA does (``snli_score``)."""
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq import metrics
from fairseq.tasks import register_task

from mue_fairseq.data import SnliVeDataset, build_answer_trie
from mue_fairseq.data.collate import pad_1d, pad_2d_rows
from mue_fairseq.data.snli_ve import answer_constraint_mask

from mue_fairseq.exits.accounting import ExitStats

from .ofa_task import OFAConfig, OFATask, add_exit_records, sum_logs

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
        batch = net_input["src_tokens"].size(0)
        expanded = {}
        for key, value in net_input.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch:
                value = value.repeat_interleave(repeats, dim=0)
            expanded[key] = value
        expanded["prev_output_tokens"] = prev_output_tokens
        return model(**expanded)

    def candidate_batch(self, prompts: List[torch.Tensor], chunk: List[int], device):
        """Rows for scoring answers ``chunk`` after each prompt (sample-major: row
        ``b * len(chunk) + j`` is sample b, answer ``chunk[j]``). Returns ``prev`` (N, T)
        decoder input (prompt + answer), ``target`` (N, T) (prompt[1:] + answer + eos),
        ``masks`` (N, L, V) allowed tokens at each answer/eos row, ``first_row`` (N,) position
        of the first answer-token prediction and ``n_rows`` (N,) answer tokens + 1."""
        pad, eos = self.tgt_dict.pad(), self.tgt_dict.eos()
        eos_item = torch.tensor([eos])
        prev, target, masks, first_row, n_rows = [], [], [], [], []
        for prompt in prompts:
            for k in chunk:
                prev.append(torch.cat([prompt, self.answer_tokens[k]]))
                target.append(torch.cat([prompt[1:], self.answer_tokens[k], eos_item]))
                masks.append(self.answer_masks[k])
                first_row.append(prompt.numel() - 1)  # target row of the first answer token
                n_rows.append(self.answer_masks[k].size(0))  # answer tokens + eos
        return (
            pad_1d(prev, pad).to(device),
            pad_1d(target, pad).to(device),
            pad_2d_rows(masks, True).to(device),
            torch.tensor(first_row, device=device),
            torch.tensor(n_rows, device=device),
        )

    def _chunks(self) -> List[List[int]]:
        step = max(1, int(self.cfg.valid_batch_size))
        n = len(self.answers)
        return [list(range(i, min(i + step, n))) for i in range(0, n, step)]

    @torch.no_grad()
    def score_answers(self, model, sample, exit_stats: Optional[ExitStats] = None,
                      incremental: Optional[bool] = None) -> torch.Tensor:
        """(B, n_answers) log-probability of each candidate answer + eos after the sample's
        decoder prompt, under the trie constraint (OFA's SNLI-VE validation score).

        Teacher-forced in one pass (OFA's way), unless exits are on (``self.exit_cfg``) or
        ``exit_stats`` is given: then :meth:`score_answers_incremental` (same scores with
        exits off, up to float rounding)."""
        if incremental is None:
            incremental = self.exit_cfg.enabled or exit_stats is not None
        if incremental:
            return self.score_answers_incremental(model, sample, exit_stats)
        prompts = [p.cpu() for p in sample["decoder_prompts"]]
        device = sample["net_input"]["src_tokens"].device
        columns = []
        for chunk in self._chunks():
            prev_tokens, target, masks, first_row, n_rows = self.candidate_batch(prompts, chunk, device)
            logits, extra = self.forward_candidates(model, sample["net_input"], len(chunk), prev_tokens)[:2]

            length = masks.size(1)
            steps = torch.arange(length, device=device)
            positions = (first_row[:, None] + steps).clamp(max=logits.size(1) - 1)
            rows = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.size(-1)))
            rows = rows.masked_fill(~masks, -math.inf)
            lprobs = model.get_normalized_probs((rows, extra), log_probs=True)
            token_scores = lprobs.gather(-1, target.gather(1, positions)[:, :, None]).squeeze(-1)
            token_scores = token_scores.masked_fill(steps[None, :] >= n_rows[:, None], 0.0)
            columns.append(token_scores.sum(1).view(len(prompts), len(chunk)).float())
        return torch.cat(columns, dim=1)

    @torch.no_grad()
    def score_answers_incremental(self, model, sample, exit_stats: Optional[ExitStats] = None) -> torch.Tensor:
        """:meth:`score_answers` with MuE exits (``self.exit_cfg``; full depth when off).

        The encoder runs once per sample (its image/text exits apply there); its output is
        repeated for the candidates. The decoder then runs incrementally, one position at a
        time, over every candidate's prompt + answer, with the decoder exit policy on: each
        position, prompt positions included, exits at its own layer and propagates its state
        to the layers it skipped, exactly as a generated token would; the log-probability of
        each answer token and eos is read at its position. N of Eq. 11 is the longest
        candidate.

        ``exit_stats`` gets one record per sample: its encoder exits and, as its decoder
        tokens, the positions whose predictions are scored (answer tokens and eos of every
        candidate; prompt positions are inputs, not predictions, and are not counted). The
        wall clock of the call is added to it.
        """
        start = time.perf_counter()
        net_input = sample["net_input"]
        prompts = [p.cpu() for p in sample["decoder_prompts"]]
        device = net_input["src_tokens"].device
        bsz = len(prompts)
        chunks = self._chunks()
        batches = [self.candidate_batch(prompts, chunk, device) for chunk in chunks]
        max_len = max(b[0].size(1) for b in batches)
        observed: List[torch.Tensor] = []
        decoder_layers: List[List[int]] = [[] for _ in range(bsz)]
        cfg = self.exit_cfg if self.exit_cfg.enabled else None
        model.set_exit_config(cfg, max_len=max_len)
        previous_observer = model.decoder.exit_observer
        model.decoder.exit_observer = lambda enc, layers: observed.append(layers)
        try:
            encoder_out = model.encoder(
                net_input["src_tokens"], src_lengths=net_input.get("src_lengths"),
                patch_images=net_input.get("patch_images"), patch_masks=net_input.get("patch_masks"),
            )
            columns = []
            for chunk, (prev_tokens, target, masks, first_row, n_rows) in zip(chunks, batches):
                n = prev_tokens.size(0)
                order = torch.arange(bsz, device=device).repeat_interleave(len(chunk))
                enc = model.encoder.reorder_encoder_out(encoder_out, order)
                incremental_state: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
                scores = torch.zeros(n, device=device)
                row_layers: List[List[int]] = [[] for _ in range(n)]
                for t in range(prev_tokens.size(1)):
                    observed.clear()
                    logits, extra = model.decoder(prev_tokens[:, : t + 1], encoder_out=enc,
                                                  incremental_state=incremental_state)
                    k = t - first_row  # answer row of position t
                    scored = ((k >= 0) & (k < n_rows)).nonzero().squeeze(1)
                    if scored.numel() == 0:
                        continue
                    rows = logits[scored, -1].masked_fill(~masks[scored, k[scored]], -math.inf)
                    lprobs = model.get_normalized_probs((rows[:, None], extra), log_probs=True)[:, 0]
                    scores[scored] += lprobs.gather(-1, target[scored, t][:, None]).squeeze(-1).float()
                    if exit_stats is not None:
                        layers = observed[-1] if observed else extra.get(
                            "exit_layer", torch.full((n,), model.decoder.num_layers))
                        layers = layers.tolist()
                        for r in scored.tolist():
                            row_layers[r].append(layers[r])
                for r, layers in enumerate(row_layers):
                    decoder_layers[r // len(chunk)].extend(layers)
                columns.append(scores.view(bsz, len(chunk)))
        finally:
            model.decoder.exit_observer = previous_observer
            model.set_exit_config(None)
        result = torch.cat(columns, dim=1)
        if exit_stats is not None:
            add_exit_records(exit_stats, encoder_out, decoder_layers, sample.get("id"))
            exit_stats.add_wall_clock(time.perf_counter() - start)
        return result

    def predict(self, model, sample, exit_stats: Optional[ExitStats] = None) -> List[str]:
        """The predicted answer of each sample (argmax of :meth:`score_answers`)."""
        scores = self.score_answers(model, sample, exit_stats)
        return [self.index2ans[i] for i in scores.argmax(1).tolist()]

    def eval_step(self, generator, models, sample, exit_stats: Optional[ExitStats] = None):
        """OFA's ``eval_snli_ve``: ``([{"uniq_id", "answer"}], [score per sample])`` (score =
        the reference's value for the predicted answer, 1 or 0). Single model only."""
        if len(models) != 1:
            raise ValueError("SNLI-VE evaluation scores candidates with one model, not an ensemble")
        hyps = self.predict(models[0], sample, exit_stats)
        results = [{"uniq_id": uid, "answer": hyp} for uid, hyp in zip(_ids(sample), hyps)]
        scores = [float(ref.get(hyp, 0)) for ref, hyp in zip(sample["ref_dict"], hyps)]
        return results, scores

    def evaluation_metrics(self, results, scores, dataset=None) -> dict:
        """``{"accuracy", "num_samples"}`` over an evaluation (OFA's ``snli_score``)."""
        n = len(scores)
        return {"accuracy": (sum(scores) / n) if n else None, "num_samples": n}

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


def _ids(sample) -> list:
    ids = sample["id"]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _snli_score(meters):
    score = meters["_snli_score_sum"].sum / meters["_snli_cnt"].sum
    return round(float(score), 4)
