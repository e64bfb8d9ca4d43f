"""``--lr-scheduler polynomial_decay`` with OFA's ``--warmup-ratio`` (mue_fairseq.optim)."""
import pytest
from fairseq import options
from fairseq.optim import FairseqOptimizer
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim.lr_scheduler import LR_SCHEDULER_DATACLASS_REGISTRY, LR_SCHEDULER_REGISTRY, build_lr_scheduler
from fairseq.optim.lr_scheduler.polynomial_decay_schedule import PolynomialDecayLRSchedule as Stock
from omegaconf import OmegaConf

import mue_fairseq  # noqa: F401
from mue_fairseq.optim.polynomial_decay_schedule import (
    PolynomialDecayLRScheduleConfig,
    WarmupRatioPolynomialDecayLRSchedule,
    total_updates,
)


class _Optimizer(FairseqOptimizer):
    def __init__(self):
        self.lr = None

    def set_lr(self, lr):
        self.lr = lr

    def get_lr(self):
        return self.lr


def _cfg(**kw):
    base = dict(warmup_updates=0, force_anneal=None, end_learning_rate=0.0, power=1.0, total_num_update=None,
                lr=[1e-3], warmup_ratio=0.0, max_epoch=0, max_update=0, update_freq=[1], batch_size=2,
                distributed_world_size=1, data=None)
    base.update(kw)
    return OmegaConf.create(base)


def _lrs(scheduler, n):
    scheduler.step_begin_epoch(1)
    return [scheduler.step_update(u) for u in range(1, n + 1)]


def test_registry_entry_is_replaced_under_the_same_name():
    assert LR_SCHEDULER_REGISTRY["polynomial_decay"] is WarmupRatioPolynomialDecayLRSchedule
    assert LR_SCHEDULER_DATACLASS_REGISTRY["polynomial_decay"] is PolynomialDecayLRScheduleConfig
    assert issubclass(WarmupRatioPolynomialDecayLRSchedule, Stock)


def test_ofa_command_line_parses_and_builds(tmp_path):
    """OFA's options (--warmup-ratio, no --total-num-update, which stock fairseq 0.12 cannot
    even convert) parse and build the scheduler."""
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{i}\tx\n" for i in range(10)))
    (tmp_path / "valid.tsv").write_text("0\tx\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        f"{train},{tmp_path / 'valid.tsv'}", "--task", "snli_ve", "--arch", "ofa_tiny",
        "--lr-scheduler", "polynomial_decay", "--lr", "1e-3", "--warmup-ratio", "0.25",
        "--max-epoch", "2", "--batch-size", "3", "--update-freq", "2", "--optimizer", "adam"])
    cfg = convert_namespace_to_omegaconf(args)
    assert cfg.lr_scheduler.warmup_ratio == 0.25 and cfg.lr_scheduler.total_num_update is None
    scheduler = build_lr_scheduler(cfg.lr_scheduler, _Optimizer())
    # 10 rows / batch 3 = 4 batches, / update_freq 2 = 2 updates per epoch, 2 epochs
    assert (scheduler.total_num_update, scheduler.warmup_updates) == (4, 1)


def test_without_warmup_ratio_the_schedule_is_stock():
    for kw in (dict(warmup_updates=3, total_num_update=10), dict(warmup_updates=0, max_update=7)):
        ours = WarmupRatioPolynomialDecayLRSchedule(_cfg(**kw), _Optimizer())
        stock_cfg = _cfg(**kw)
        stock_cfg.total_num_update = stock_cfg.total_num_update or stock_cfg.max_update
        assert _lrs(ours, 12) == _lrs(Stock(stock_cfg, _Optimizer()), 12)


def test_warmup_ratio_from_max_update():
    s = WarmupRatioPolynomialDecayLRSchedule(_cfg(warmup_ratio=0.2, max_update=10, warmup_updates=5), _Optimizer())
    assert (s.total_num_update, s.warmup_updates) == (10, 2)
    assert _lrs(s, 10) == pytest.approx([5e-4, 1e-3] + [1e-3 * (1 - k / 8) for k in range(1, 9)])


def test_total_updates_counts_epochs_files_ranks_and_update_freq(tmp_path):
    a, b, v = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "v.tsv"
    a.write_text("".join(f"{i}\n" for i in range(10)))
    b.write_text("".join(f"{i}\n" for i in range(5)))
    v.write_text("0\n")
    data = f"{a},{b},{v}"
    # epochs use a, b, a: 10 rows -> 5 batches of 2 -> 3 updates (update_freq 2); 5 rows -> 3 -> 2
    assert total_updates(_cfg(data=data, max_epoch=3, update_freq=[2])) == 3 + 2 + 3
    # per-epoch update_freq [1, 2]: 5 + 2 + 3
    assert total_updates(_cfg(data=data, max_epoch=3, update_freq=[1, 2])) == 10
    # 2 ranks: a rank holds ceil(10 / 2) = 5 rows -> 3 batches
    assert total_updates(_cfg(data=data, max_epoch=1, distributed_world_size=2)) == 3
    assert total_updates(_cfg(data=data, max_epoch=3, max_update=4)) == 4  # training stops there
    with pytest.raises(ValueError, match="--max-epoch or --max-update"):
        total_updates(_cfg(data=data))
    with pytest.raises(ValueError, match="give --max-update instead"):
        total_updates(_cfg(data=str(a), max_epoch=1))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        total_updates(_cfg(data=f"{tmp_path / 'missing.tsv'},{v}", max_epoch=1))
