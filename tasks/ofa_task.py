"""Base of the OFA fine-tuning tasks: options, dictionary, BPE, TSV data, batching.

The config keeps OFA's field names and defaults (``tasks/ofa_task.py`` of OFA), so the
task configs saved in released checkpoints load, and adds MuE's early-exit options by
inheriting :class:`~mue_fairseq.exits.config.ExitConfig` (flat: ``--encoder-exit`` etc.).
"""
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from fairseq.data import iterators
from fairseq.tasks import FairseqTask, register_task

import mue_fairseq.optim  # noqa: F401  (replaces polynomial_decay with the --warmup-ratio version)
from mue_fairseq.data import TSVReader, build_bpe, build_ofa_dictionary
from mue_fairseq.data.base import OFAImageTextDataset
from mue_fairseq.exits.accounting import ExitRecord, ExitStats
from mue_fairseq.exits.config import ExitConfig
from mue_fairseq.generation.exit_generator import ExitAwareSequenceGenerator, sample_ids

logger = logging.getLogger(__name__)


@dataclass
class OFAConfig(ExitConfig):
    data: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated TSV files: the training files (one per epoch, round robin) "
            "followed by the validation file, which is always the last"
        },
    )
    selected_cols: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated 0-based TSV columns the task reads, in its order "
                  "(e.g. 0,2,3,4,5 for SNLI-VE); default: all columns"},
    )
    bpe: Optional[str] = field(default="gpt2", metadata={"help": "which BPE to use (gpt2)"})
    bpe_dir: Optional[str] = field(
        default=None,
        metadata={"help": "folder with the BPE files: dict.txt, encoder.json, vocab.bpe"},
    )
    max_source_positions: int = field(
        default=1024, metadata={"help": "max number of tokens in the source sequence"}
    )
    max_target_positions: int = field(
        default=1024, metadata={"help": "max number of tokens in the target sequence"}
    )
    max_src_length: int = field(
        default=128, metadata={"help": "the maximum number of words of each source text"}
    )
    max_tgt_length: int = field(
        default=30, metadata={"help": "the maximum number of words of a training target"}
    )
    code_dict_size: int = field(
        default=8192, metadata={"help": "number of image-code tokens <code_i> in the dictionary"}
    )
    patch_image_size: int = field(
        default=480, metadata={"help": "side of the square image fed to the model, in pixels"}
    )
    orig_patch_image_size: int = field(
        default=256, metadata={"help": "patch image size the image position table was built for"}
    )
    num_bins: int = field(
        default=1000, metadata={"help": "number of location-bin tokens <bin_i> in the dictionary"}
    )
    imagenet_default_mean_and_std: bool = field(
        default=False,
        metadata={"help": "normalise images with ImageNet mean/std instead of 0.5/0.5"},
    )
    constraint_range: Optional[str] = field(
        default=None,
        metadata={"help": "'start,end': restrict predictions to dictionary ids in [start, end) "
                  "(plus the special tokens)"},
    )


@register_task("ofa", dataclass=OFAConfig)
class OFATask(FairseqTask):
    """Shared OFA task logic. Subclasses set ``dataset_class`` and implement
    :meth:`build_dataset`.

    Attributes: ``src_dict``/``tgt_dict`` (the same unified dictionary), ``bpe`` (fairseq
    GPT-2 BPE from ``--bpe-dir``), ``exit_cfg`` (validated :class:`ExitConfig`).
    """

    dataset_class = OFAImageTextDataset

    def __init__(self, cfg: OFAConfig, src_dict, tgt_dict, bpe=None):
        super().__init__(cfg)
        self.src_dict = src_dict
        self.tgt_dict = tgt_dict
        self.bpe = bpe if bpe is not None else build_bpe(cfg.bpe, cfg.bpe_dir)
        self.exit_cfg = ExitConfig.from_cfg(cfg).validate()

    @classmethod
    def setup_task(cls, cfg: OFAConfig, **kwargs):
        dictionary = build_ofa_dictionary(cfg.bpe_dir, cfg.code_dict_size, cfg.num_bins)
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary, dictionary)

    # ------------------------------------------------------------------ data
    def data_paths(self):
        paths = [p.strip() for p in (self.cfg.data or "").split(",") if p.strip()]
        if not paths:
            raise ValueError("--data is not set: give the TSV files, e.g. --data=train.tsv,valid.tsv")
        return paths

    def data_path(self, split: str, epoch: int = 1) -> str:
        """OFA's rule: ``train`` takes training file ``(epoch - 1) % n_train``; every other
        split takes the last file."""
        paths = self.data_paths()
        if split != "train":
            return paths[-1]
        train = paths[:-1]
        if not train:
            raise ValueError(
                f"--data={self.cfg.data} has one file, but training needs the training file(s) "
                "followed by the validation file: --data=train.tsv,valid.tsv"
            )
        return train[(epoch - 1) % len(train)]

    def has_sharded_data(self, split):
        # several training files: reload the training set each epoch to rotate through them
        return len(self.data_paths()) > 2 if self.cfg.data else False

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        path = self.data_path(split, epoch)
        reader = TSVReader(path, self.cfg.selected_cols, fields=self.dataset_class.FIELDS)
        logger.info("%s: %r", split, reader)
        self.datasets[split] = self.build_dataset(split, reader)

    def build_dataset(self, split: str, reader: TSVReader) -> OFAImageTextDataset:
        raise NotImplementedError

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ):
        """OFA's batching: consecutive rows of this rank's slice, ``max_sentences`` at a
        time (fairseq shuffles the batch order per epoch). The readers are already sliced by
        rank, so the iterator itself is not sharded; a rank whose slice yields fewer batches
        than ``ceil(ceil(total_rows / num_shards) / max_sentences)`` gets empty (dummy)
        batches, keeping all ranks in step."""
        if not isinstance(dataset, OFAImageTextDataset):
            return super().get_batch_iterator(
                dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                required_batch_size_multiple, seed, num_shards, shard_id, num_workers, epoch,
                data_buffer_size, disable_iterator_cache, skip_remainder_batch,
                grouped_shuffling, update_epoch_batch_itr,
            )
        if not max_sentences:
            raise ValueError("OFA tasks batch by sentences: set --batch-size (and --batch-size-valid)")
        dataset.set_epoch(epoch)
        n = len(dataset)
        batches = [list(range(i, min(i + max_sentences, n))) for i in range(0, n, max_sentences)]
        num_batches = batches_per_epoch(dataset.reader.get_total_row_count(), max_sentences, num_shards)
        batches += [[] for _ in range(num_batches - len(batches))]
        return iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=batches,
            seed=seed,
            num_shards=1,
            shard_id=0,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            skip_remainder_batch=skip_remainder_batch,
        )

    # ------------------------------------------------------------------ model
    def build_model(self, cfg, from_checkpoint=False):
        """Build the model; the BPE from --bpe-dir was already set up with the task
        (``self.bpe``). Subclasses add their evaluation helpers here."""
        return super().build_model(cfg, from_checkpoint)

    # ------------------------------------------------------------------ generation
    def build_generator(
        self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None,
    ):
        """fairseq's generator, made OFA's and MuE's:

        * with exits on (``self.exit_cfg.enabled``) and no ``seq_gen_cls`` given, an
          :class:`ExitAwareSequenceGenerator` with ``exit_cfg=self.exit_cfg`` (its ``.stats``
          collects the exit statistics); otherwise fairseq's stock generator. Passing
          ``seq_gen_cls=ExitAwareSequenceGenerator`` explicitly gives one with exits off too
          (full depth, but statistics and wall clock are recorded: the evaluation baseline);
        * ``--constraint-range START,END`` (OFA's task option) restricts every generated token
          to the special symbols and ids in [START, END), through fairseq's prefix-constrained
          beam search.

        Generation starts from BOS: see :meth:`inference_step`.
        """
        extra = dict(extra_gen_cls_kwargs or {})
        if prefix_allowed_tokens_fn is None and self.cfg.constraint_range:
            prefix_allowed_tokens_fn = constraint_range_fn(self.cfg.constraint_range, len(self.tgt_dict))
        if seq_gen_cls is None and self.exit_cfg.enabled and not getattr(args, "score_reference", False):
            seq_gen_cls = ExitAwareSequenceGenerator
        if seq_gen_cls is not None and issubclass(seq_gen_cls, ExitAwareSequenceGenerator):
            extra.setdefault("exit_cfg", self.exit_cfg)
        return super().build_generator(
            models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """As fairseq's, but decoding starts from BOS (OFA's models are trained on
        ``prev_output_tokens = [bos] + target``), not from EOS."""
        with torch.no_grad():
            return generator.generate(
                models, sample, prefix_tokens=prefix_tokens, constraints=constraints,
                bos_token=self.tgt_dict.bos(),
            )

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        """As fairseq's, but passes ``update_num`` to criterions that accept it (OFA's
        criterions use it, e.g. drop-worst after N updates)."""
        from fairseq.optim.amp_optimizer import AMPOptimizer

        model.train()
        model.set_num_updates(update_num)
        extra = {"update_num": update_num} if _accepts(getattr(criterion, "forward", criterion), "update_num") else {}
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output = criterion(model, sample, **extra)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        return loss, sample_size, logging_output

    def max_positions(self):
        return (self.cfg.max_source_positions, self.cfg.max_target_positions)

    @property
    def source_dictionary(self):
        return self.src_dict

    @property
    def target_dictionary(self):
        return self.tgt_dict


def batches_per_epoch(total_rows: int, batch_size: int, num_shards: int = 1) -> int:
    """Batches every rank iterates over in an epoch of a ``total_rows``-row TSV file: the
    largest rank slice (``ceil(total_rows / num_shards)`` rows) in batches of ``batch_size``;
    ranks with fewer rows pad with empty batches (see ``OFATask.get_batch_iterator``)."""
    return math.ceil(math.ceil(total_rows / num_shards) / batch_size)


def constraint_range_fn(constraint_range: str, vocab_size: int):
    """``prefix_allowed_tokens_fn`` for ``--constraint-range START,END``: the special symbols
    0..3 and ids START..END-1 (OFA's generator masks every other id)."""
    try:
        start, end = (int(x) for x in constraint_range.split(","))
    except ValueError:
        raise ValueError(f"--constraint-range must be 'START,END', got {constraint_range!r}") from None
    if not 4 <= start < end <= vocab_size:
        raise ValueError(f"--constraint-range {constraint_range}: need 4 <= START < END <= {vocab_size}")
    allowed = list(range(4)) + list(range(start, end))
    return lambda batch_id, tokens: allowed


# ---------------------------------------------------------------------- exit statistics
def new_exit_stats(model) -> ExitStats:
    """An empty :class:`ExitStats` for ``model``'s dimensions (as the exit-aware generator's)."""
    return ExitStats(
        num_encoder_layers=model.encoder.num_layers,
        num_decoder_layers=model.decoder.num_layers,
        embed_dim=model.decoder.embed_dim,
        ffn_dim=model.decoder.layers[0].fc1.out_features,
        decomposed_encoder=bool(model.encoder.decompose_modalities),
    )


def add_exit_records(
    stats: ExitStats,
    encoder_out: Dict[str, List[torch.Tensor]],
    decoder_layers: Sequence[Sequence[int]],
    ids=None,
) -> None:
    """One :class:`ExitRecord` per sample of ``encoder_out`` (batch B, as the encoder returned
    it): the image/text exit layers the encoder reported (full depth when it reported none),
    the non-pad token count of each stream, and ``decoder_layers[b]``: the decoder exit layer
    of each counted token of sample b. The decoder propagates an exited token's state to the
    layers it skipped, so ``propagated_layers`` is N_D - exit layer per token."""
    pad, modality = encoder_out["encoder_padding_mask"][0], encoder_out["modality"][0]
    bsz = pad.size(0)
    image_tokens = ((modality == 1) & ~pad).sum(1).tolist()
    text_tokens = ((modality == 0) & ~pad).sum(1).tolist()
    full = [stats.num_encoder_layers] * bsz
    image_exit = encoder_out["image_exit_layer"][0].tolist() if encoder_out.get("image_exit_layer") else full
    text_exit = encoder_out["text_exit_layer"][0].tolist() if encoder_out.get("text_exit_layer") else full
    n_dec = stats.num_decoder_layers
    for i, sample_id in enumerate(sample_ids(ids, bsz)):
        layers = [int(k) for k in decoder_layers[i]]
        stats.add(ExitRecord(
            image_exit_layer=int(image_exit[i]), text_exit_layer=int(text_exit[i]),
            image_tokens=int(image_tokens[i]), text_tokens=int(text_tokens[i]),
            decoder_exit_layers=layers, propagated_layers=[n_dec - k for k in layers],
            sample_id=sample_id,
        ))


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def sum_logs(logging_outputs, key):
    """Sum ``key`` over the logging outputs (tensors moved to CPU)."""
    total = sum(log.get(key, 0) for log in logging_outputs)
    return total.cpu() if torch.is_tensor(total) else total
