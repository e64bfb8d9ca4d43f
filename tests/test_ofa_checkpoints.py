"""Checkpoints in OFA's released format load into the plugin: a fine-tuned one (saved cfg with
model `ofa_*` as an argparse.Namespace and task `snli_ve`) for evaluation, strictly, with
outputs unchanged; a pretrained one (task `unify_task`) as a state dict for --restore-file."""
import argparse

import torch
from fairseq import checkpoint_utils
from omegaconf import OmegaConf

from helpers_data import make_bpe_dir, snli_tsv
from mue_fairseq.testing import deterministic_fill_
from ofa_helpers import TINY_RELEASED, build_ofa, dictionary_of


def _ofa_checkpoint(path, model, model_args, task_cfg):
    """The layout OFA's trainer writes (trainer.py state_dict): cfg.model is a Namespace."""
    cfg = OmegaConf.create({"common": {"seed": 7}, "task": task_cfg, "criterion": None,
                            "optimization": {"lr": [3e-5]}}, flags={"allow_objects": True})
    with OmegaConf.open_dict(cfg) if hasattr(OmegaConf, "open_dict") else _nullcontext():
        cfg.model = argparse.Namespace(**model_args)
    state = {
        "args": None, "cfg": cfg, "model": model.state_dict(), "criterion": None,
        "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion",
                               "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": None},
                               "num_updates": 1000}],
        "task_state": {}, "extra_state": {"metrics": {}, "previous_training_time": 1.0,
                                          "train_iterator": {"epoch": 3, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(state, str(path))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_released_finetuned_checkpoint_loads_for_evaluation(tmp_path):
    bpe_dir = make_bpe_dir(tmp_path / "bpe")
    data = snli_tsv(tmp_path / "ve.tsv")
    from mue_fairseq.data import build_ofa_dictionary
    dictionary = build_ofa_dictionary(bpe_dir, code_dict_size=8, num_bins=8)
    model_args = {**TINY_RELEASED, "_name": "ofa_tiny", "arch": "ofa_tiny", "patch_image_size": 64}
    model = deterministic_fill_(build_ofa(dict(TINY_RELEASED), dictionary), 5).eval()
    # an old OFA task config: unknown/missing fields must not matter
    task_cfg = {"_name": "snli_ve", "data": "/nonexistent/train.tsv,/nonexistent/dev.tsv", "bpe_dir": "/nonexistent",
                "selected_cols": "0,2,3,4,5", "code_dict_size": 8, "num_bins": 8, "patch_image_size": 64,
                "max_src_length": 80, "max_tgt_length": 20, "add_caption": True, "prompt_type": "prev_output",
                "some_field_of_an_older_ofa": 1}
    path = tmp_path / "snli_ve_base_best.pt"
    _ofa_checkpoint(path, model, model_args, task_cfg)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": data, "bpe_dir": bpe_dir, "selected_cols": "0,2,3,4,5"}, strict=True)
    loaded = models[0].eval()
    assert type(loaded).__name__ == "OFAModel" and task.__class__.__name__.lower().startswith("snli")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    src = torch.tensor([[5, 6, 7, 2]])
    images = torch.randn(1, 3, 64, 64)
    prev = torch.tensor([[0, 8, 9]])
    with torch.no_grad():
        a, _ = model(src, torch.tensor([4]), prev, patch_images=images, patch_masks=torch.tensor([True]))
        b, _ = loaded(src, torch.tensor([4]), prev, patch_images=images, patch_masks=torch.tensor([True]))
    assert torch.equal(a, b)


def test_pretrained_checkpoint_state_dict_restores_strictly(tmp_path):
    dictionary = dictionary_of([f"tok{i}" for i in range(100)])
    source = deterministic_fill_(build_ofa(dict(TINY_RELEASED), dictionary), 1)
    path = tmp_path / "ofa_tiny.pt"
    _ofa_checkpoint(path, source, {**TINY_RELEASED, "_name": "ofa_tiny"}, {"_name": "unify_task"})
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    target = build_ofa(dict(TINY_RELEASED), dictionary)
    target.load_state_dict(state["model"], strict=True, model_cfg=None)  # what --restore-file does
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
