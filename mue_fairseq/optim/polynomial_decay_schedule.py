"""``--lr-scheduler polynomial_decay`` with OFA's ``--warmup-ratio``.

OFA's run scripts say ``--lr-scheduler=polynomial_decay --max-epoch=5 --warmup-ratio=0.06``.
``--warmup-ratio`` exists only in OFA's fork of fairseq (its scheduler plus a hook in its
``train.py`` that re-initialises the scheduler once the number of updates is known); stock
``fairseq-train`` rejects it. The plugin therefore provides the option under the *same*
scheduler name, so the scripts keep working unchanged with stock ``fairseq-train``.

Why the registry entry is replaced (deliberately)
-------------------------------------------------
fairseq's ``register_lr_scheduler`` refuses a second registration of a name ("Cannot
register duplicate lr_scheduler"), and a new name would break every OFA script. Registering
is nothing more than three table entries, which this module overwrites at import (i.e. with
``--user-dir``, before fairseq builds its parser from those tables):
``LR_SCHEDULER_REGISTRY["polynomial_decay"]`` (the class), ``LR_SCHEDULER_DATACLASS_REGISTRY``
(its options, which the command-line parser and the omegaconf conversion read) and hydra's
``ConfigStore`` node ``lr_scheduler/polynomial_decay``. The replacement is a subclass of
fairseq's class and config: every stock option keeps its meaning and default, and with
``--warmup-ratio 0`` (the default) the schedule is exactly stock fairseq's.

The schedule with ``--warmup-ratio r > 0`` (OFA's ``reinit``)
-------------------------------------------------------------
``total = `` the number of updates training will make, ``warmup = int(total * r)``; linear
warmup to ``--lr`` over ``warmup`` updates, then polynomial decay to ``--end-learning-rate``
at ``total`` (``--warmup-updates`` and ``--total-num-update`` are ignored, with a warning for
the former). Also fixed: stock fairseq 0.12 cannot convert its own command line when
``--total-num-update`` is not given (``field 'lr_scheduler.total_num_update' is not
Optional``); here it is optional and defaults to ``--max-update``, as documented. ``total`` is

* with ``--max-epoch E``: the sum over epochs e = 1..E of ``ceil(batches_e / update_freq_e)``,
  where ``batches_e`` is what every rank iterates over in epoch e: the training TSV of that
  epoch (OFA's round robin over the files before the last, validation, file of ``--data``)
  has R rows, a rank holds ``ceil(R / world_size)`` of them, in batches of ``--batch-size``.
  OFA's fork computes the same from the first epoch's iterator; counting rows needs one pass
  over each training file (the same pass the dataset makes to index its rows). When
  ``--max-update`` is also set, the smaller of the two (training stops there).
* without ``--max-epoch``: ``--max-update``.

The scheduler's state is recomputed from the configuration on resume (fairseq stores only
``best`` for schedulers), so a resumed run follows the same schedule.
"""
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from fairseq.optim.lr_scheduler import (
    LR_SCHEDULER_DATACLASS_REGISTRY,
    LR_SCHEDULER_REGISTRY,
    FairseqLRScheduler,
)
from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (
    PolynomialDecayLRSchedule as StockPolynomialDecayLRSchedule,
)
from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (
    PolynomialDecayLRScheduleConfig as StockPolynomialDecayLRScheduleConfig,
)
from omegaconf import II

logger = logging.getLogger(__name__)

NAME = "polynomial_decay"


@dataclass
class PolynomialDecayLRScheduleConfig(StockPolynomialDecayLRScheduleConfig):
    # Optional here: fairseq's command line leaves it None when not given, which stock
    # fairseq 0.12 then fails to convert ("field 'lr_scheduler.total_num_update' is not
    # Optional"); None means --max-update, the documented default.
    total_num_update: Optional[float] = field(
        default=II("optimization.max_update"),
        metadata={"help": "total number of updates over which to decay learning rate "
                  "(default: --max-update)"},
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "warm up linearly over this fraction of all training updates (OFA's option; "
            "the total comes from --max-epoch and the training data, or from --max-update); "
            "overrides --warmup-updates and --total-num-update when > 0"
        },
    )
    # Read from the rest of the configuration, no options of their own (an interpolation
    # default without help text is skipped by fairseq's parser; fairseq copies the values of
    # the same-named options into these fields).
    max_epoch: int = II("optimization.max_epoch")
    max_update: int = II("optimization.max_update")
    update_freq: List[int] = II("optimization.update_freq")
    batch_size: Optional[int] = II("dataset.batch_size")
    distributed_world_size: int = II("distributed_training.distributed_world_size")
    data: Optional[str] = "${oc.select:task.data,null}"  # tasks without --data: None


_ROW_COUNTS: Dict[Tuple[str, int, float], int] = {}


def count_rows(path: str) -> int:
    """Rows (lines) of a TSV file, as the datasets count them; cached per file version."""
    from mue_fairseq.data.tsv import index_lines

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    if key not in _ROW_COUNTS:
        _ROW_COUNTS[key] = len(index_lines(path))
    return _ROW_COUNTS[key]


def _world_size(cfg) -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:  # pragma: no cover
        pass
    return max(1, int(cfg.distributed_world_size or 1))


def updates_per_epoch(cfg, epoch: int, world_size: int) -> int:
    """Optimizer updates in ``epoch`` (1-based) of an OFA task reading ``cfg.data``."""
    from mue_fairseq.tasks.ofa_task import batches_per_epoch

    paths = [p.strip() for p in (cfg.data or "").split(",") if p.strip()]
    if len(paths) < 2:
        raise ValueError(
            "--warmup-ratio with --max-epoch counts the training rows of --data "
            "(train.tsv[,train2.tsv...],valid.tsv), but --data is "
            f"{cfg.data!r}; give --max-update instead"
        )
    train = paths[:-1]
    path = train[(epoch - 1) % len(train)]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: training file not found (from --data)")
    if not cfg.batch_size:
        raise ValueError("--warmup-ratio with --max-epoch needs --batch-size")
    batches = batches_per_epoch(count_rows(path), int(cfg.batch_size), world_size)
    freqs = list(cfg.update_freq or [1])
    return math.ceil(batches / int(freqs[min(epoch - 1, len(freqs) - 1)]))


def total_updates(cfg) -> int:
    """Total training updates for ``--warmup-ratio`` (see the module docstring)."""
    max_update = int(cfg.max_update or 0)
    max_epoch = int(cfg.max_epoch or 0)
    if max_epoch > 0:
        world = _world_size(cfg)
        total = sum(updates_per_epoch(cfg, e, world) for e in range(1, max_epoch + 1))
        return min(total, max_update) if max_update > 0 else total
    if max_update > 0:
        return max_update
    raise ValueError("--warmup-ratio needs --max-epoch or --max-update to know the number of updates")


class WarmupRatioPolynomialDecayLRSchedule(StockPolynomialDecayLRSchedule):
    """fairseq's polynomial decay; with ``--warmup-ratio`` OFA's warmup over a fraction of all
    updates. Attributes ``total_num_update`` and ``warmup_updates`` hold the schedule used."""

    def __init__(self, cfg: PolynomialDecayLRScheduleConfig, optimizer):
        FairseqLRScheduler.__init__(self, cfg, optimizer)
        self.lr = cfg.lr[0]
        self.end_learning_rate = cfg.end_learning_rate
        self.power = cfg.power
        ratio = float(getattr(cfg, "warmup_ratio", 0.0) or 0.0)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1], got {ratio}")
        if ratio > 0:
            self.total_num_update = total_updates(cfg)
            self.warmup_updates = int(self.total_num_update * ratio)
            if cfg.warmup_updates:
                logger.warning("--warmup-ratio %s overrides --warmup-updates %s", ratio, cfg.warmup_updates)
            logger.info("polynomial_decay: %d updates in total, %d warmup updates (--warmup-ratio %s)",
                        self.total_num_update, self.warmup_updates, ratio)
        else:
            self.total_num_update = cfg.total_num_update
            if self.total_num_update is None:
                self.total_num_update = cfg.max_update
            self.warmup_updates = int(cfg.warmup_updates or 0)
        if not (self.total_num_update and self.total_num_update > 0):
            raise ValueError("--lr-scheduler polynomial_decay needs --total-num-update or --max-update > 0 "
                             "(or --warmup-ratio with --max-epoch)")
        self.warmup_factor = 1.0 / self.warmup_updates if self.warmup_updates > 0 else 1
        self.optimizer.set_lr(self.warmup_factor * self.lr)

    def step_update(self, num_updates):
        """Update the learning rate after each update (fairseq's rule, with this schedule's
        warmup and total)."""
        warmup = self.warmup_updates
        if warmup > 0 and num_updates <= warmup:
            self.warmup_factor = num_updates / float(warmup)
            lr = self.warmup_factor * self.lr
        elif num_updates >= self.total_num_update:
            lr = self.end_learning_rate
        else:
            lr_range = self.lr - self.end_learning_rate
            pct_remaining = 1 - (num_updates - warmup) / (self.total_num_update - warmup)
            lr = lr_range * pct_remaining ** self.power + self.end_learning_rate
        self.optimizer.set_lr(lr)
        return self.optimizer.get_lr()


def install() -> None:
    """Make ``polynomial_decay`` name this module's scheduler (idempotent)."""
    from hydra.core.config_store import ConfigStore

    LR_SCHEDULER_REGISTRY[NAME] = WarmupRatioPolynomialDecayLRSchedule
    LR_SCHEDULER_DATACLASS_REGISTRY[NAME] = PolynomialDecayLRScheduleConfig
    setattr(WarmupRatioPolynomialDecayLRSchedule, "__dataclass", PolynomialDecayLRScheduleConfig)
    node = PolynomialDecayLRScheduleConfig()
    node._name = NAME
    ConfigStore.instance().store(name=NAME, group="lr_scheduler", node=node, provider="fairseq")


install()
