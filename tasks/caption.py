"""fairseq task ``caption``: image captioning, validated by CIDEr-D (``cider``) and BLEU."""
import json
import logging
from argparse import Namespace
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import List, Optional, Tuple

import numpy as np
from fairseq import metrics
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks import register_task

from mue_fairseq.data import CaptionDataset, decode_tokens
from mue_fairseq.data.caption import REFERENCE_SEPARATOR
from mue_fairseq.data.text import strip_punctuation

from mue_fairseq.cider import CiderD
from .ofa_task import OFAConfig, OFATask, sum_logs

logger = logging.getLogger(__name__)

EVAL_BLEU_ORDER = 4


@dataclass
class CaptionConfig(OFAConfig):
    eval_bleu: bool = field(default=False, metadata={"help": "evaluation with BLEU scores"})
    eval_cider: bool = field(default=False, metadata={"help": "evaluation with CIDEr scores"})
    eval_args: Optional[str] = field(
        default="{}",
        metadata={"help": 'generation args for BLEU or CIDEr scoring, as JSON, e.g. '
                  '\'{"beam": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}\''},
    )
    eval_print_samples: bool = field(
        default=False, metadata={"help": "print sample generations during validation"}
    )
    eval_cider_cached_tokens: Optional[str] = field(
        default=None,
        metadata={"help": "pickle of document frequencies for CIDEr (e.g. coco-valid-words.p); "
                  "unset: frequencies from each validation batch's references"},
    )
    scst: bool = field(default=False, metadata={"help": "self-critical sequence training"})
    scst_args: str = field(
        default="{}",
        metadata={"help": "generation args for self-critical sequence training, as JSON"},
    )


def _json_option(text: str, option: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value


@register_task("caption", dataclass=CaptionConfig)
class CaptionTask(OFATask):
    """After ``build_model``: ``sequence_generator`` (with --eval-bleu/--eval-cider, from
    ``--eval-args``), ``cider_scorer`` (with --eval-cider) and ``scst_generator`` (with
    --scst, from ``--scst-args``; used by the SCST criterion)."""

    dataset_class = CaptionDataset

    def build_dataset(self, split, reader):
        cfg = self.cfg
        return CaptionDataset(
            split, reader, self.bpe, self.tgt_dict,
            max_src_length=cfg.max_src_length,
            max_tgt_length=cfg.max_tgt_length,
            patch_image_size=cfg.patch_image_size,
            imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std,
            scst=getattr(cfg, "scst", False),
        )

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.eval_bleu or self.cfg.eval_cider:
            gen_args = _json_option(self.cfg.eval_args, "--eval-args")
            self.sequence_generator = self.build_generator([model], Namespace(**gen_args))
        if self.cfg.eval_cider:
            self.cider_scorer = CiderD(self.cfg.eval_cider_cached_tokens)
        if getattr(self.cfg, "scst", False):
            scst_args = _json_option(self.cfg.scst_args, "--scst-args")
            # SCST candidates are training data: always full depth, whatever the exit options
            self.scst_generator = self.build_generator([model], Namespace(**scst_args),
                                                       seq_gen_cls=SequenceGenerator)
        return model

    # ------------------------------------------------------------------ validation
    def decode(self, tokens) -> str:
        """Ids → text (BPE tokens only; specials, codes and bins dropped)."""
        return decode_tokens(tokens, self.bpe, self.tgt_dict)

    def generate_captions(self, generator, sample, model) -> Tuple[List[str], List[List[str]]]:
        """Best beam hypothesis per sample and its references, both punctuation-free
        (OFA's post-processing)."""
        outputs = self.inference_step(generator, [model], sample)
        pad = self.tgt_dict.pad()
        hyps, refs = [], []
        for i, hypos in enumerate(outputs):
            hyps.append(strip_punctuation(self.decode(hypos[0]["tokens"])))
            target = sample["target"][i]
            text = self.decode(target[target.ne(pad)])
            refs.append([strip_punctuation(r) for r in text.split(REFERENCE_SEPARATOR)])
        if self.cfg.eval_print_samples and hyps:
            logger.info("example hypothesis: %s", hyps[0])
            logger.info("example reference: %s", " && ".join(refs[0]))
        return hyps, refs

    def eval_step(self, generator, models, sample, exit_stats=None):
        """OFA's ``eval_caption``: ``([{"image_id": str, "caption"}], None)``, the best beam
        hypothesis with punctuation removed. Exit statistics are recorded by an exit-aware
        ``generator`` itself (its ``.stats``); ``exit_stats`` is not used here."""
        outputs = self.inference_step(generator, models, sample)
        ids = sample["id"].tolist() if hasattr(sample["id"], "tolist") else list(sample["id"])
        return [
            {"image_id": str(sample_id), "caption": strip_punctuation(self.decode(hypos[0]["tokens"]))}
            for sample_id, hypos in zip(ids, outputs)
        ], None

    def evaluation_metrics(self, results, scores, dataset=None, log=print) -> dict:
        """COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE when it can run) of
        ``results`` against the raw references in ``dataset``'s TSV file (see
        :mod:`mue_fairseq.caption_metrics`). A repeated image id is scored once (first
        prediction)."""
        from mue_fairseq.caption_metrics import caption_scores, read_references

        predictions = {}
        for r in results:
            predictions.setdefault(str(r["image_id"]), r["caption"])
        reader = dataset.reader
        references = read_references(reader.path, reader.selected_cols, fields=dataset.FIELDS)
        metrics_ = caption_scores(predictions, references, log=log)
        metrics_["num_images"] = len(predictions)
        return metrics_

    def valid_step(self, sample, model, criterion, **kwargs):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if not (self.cfg.eval_bleu or self.cfg.eval_cider):
            return loss, sample_size, logging_output
        model.eval()
        hyps, refs = self.generate_captions(self.sequence_generator, sample, model)
        if self.cfg.eval_bleu:
            import sacrebleu

            tokenize = "none" if getattr(self.cfg, "eval_tokenized_bleu", False) else "13a"
            bleu = sacrebleu.corpus_bleu(hyps, list(zip_longest(*refs)), tokenize=tokenize)
            logging_output["_bleu_sys_len"] = bleu.sys_len
            logging_output["_bleu_ref_len"] = bleu.ref_len
            for i in range(EVAL_BLEU_ORDER):
                logging_output[f"_bleu_counts_{i}"] = bleu.counts[i]
                logging_output[f"_bleu_totals_{i}"] = bleu.totals[i]
        if self.cfg.eval_cider:
            scores = self.cider_scorer.scores(hyps, refs)
            logging_output["_cider_score_sum"] = float(scores.sum())
            logging_output["_cider_cnt"] = int(scores.size)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if self.cfg.eval_bleu:
            counts = [sum_logs(logging_outputs, f"_bleu_counts_{i}") for i in range(EVAL_BLEU_ORDER)]
            totals = [sum_logs(logging_outputs, f"_bleu_totals_{i}") for i in range(EVAL_BLEU_ORDER)]
            if max(totals) > 0:
                metrics.log_scalar("_bleu_counts", np.array(counts))
                metrics.log_scalar("_bleu_totals", np.array(totals))
                metrics.log_scalar("_bleu_sys_len", sum_logs(logging_outputs, "_bleu_sys_len"))
                metrics.log_scalar("_bleu_ref_len", sum_logs(logging_outputs, "_bleu_ref_len"))
                metrics.log_derived("bleu", _bleu)
        if self.cfg.eval_cider and sum_logs(logging_outputs, "_cider_cnt") > 0:
            metrics.log_scalar("_cider_score_sum", sum_logs(logging_outputs, "_cider_score_sum"))
            metrics.log_scalar("_cider_cnt", sum_logs(logging_outputs, "_cider_cnt"))
            metrics.log_derived("cider", _cider)


def _cider(meters):
    return round(float(meters["_cider_score_sum"].sum / meters["_cider_cnt"].sum), 3)


def _bleu(meters):
    from sacrebleu.metrics import BLEU

    bleu = BLEU.compute_bleu(
        correct=meters["_bleu_counts"].sum,
        total=meters["_bleu_totals"].sum,
        sys_len=int(meters["_bleu_sys_len"].sum),
        ref_len=int(meters["_bleu_ref_len"].sum),
        smooth_method="exp",
    )
    return round(bleu.score, 2)
