"""Safe loading of fairseq/OFA checkpoints (mue_fairseq.checkpoint_safety).

Checkpoints are written the way fairseq writes them (checkpoint_utils.torch_persistent_save of
a Trainer.state_dict()-shaped dict), re-saved the way checkpoint-cleaning scripts do (cfg then
an OmegaConf DictConfig), in the legacy ``args`` layout, and with numpy-1.x global names.
"""
import argparse
import collections
import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import mue_fairseq  # noqa: F401  (installs the hook)
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from mue_fairseq import checkpoint_safety as cs

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------- helpers
def pickle_globals(path):
    """Fully qualified globals named by a torch zip checkpoint's pickle (Python 3 names)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "GLOBAL":
            module, name = arg.split(" ")
        elif op.name == "STACK_GLOBAL":
            module, name = strings[-2], strings[-1]
        else:
            continue
        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        found.add(f"{module}.{name}")
    return found


@pytest.fixture(scope="module")
def fairseq_args():
    """A complete legacy argparse namespace, as fairseq's training parser makes it."""
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser,
        input_args=["/data-bin", "--task", "translation", "--arch", "transformer",
                    "--optimizer", "adam", "--lr", "0.0005", "--cpu"],
    )


def _model_and_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def trainer_state(fairseq_args):
    """What fairseq's Trainer.state_dict() + save_checkpoint produce (OFA trains the same way):
    cfg as a plain container whose ``model`` is the argparse namespace (legacy-registered
    architectures), numpy scalars in extra_state (metrics logged from numpy scores)."""
    cfg = convert_namespace_to_omegaconf(fairseq_args)
    model_sd, optim_sd = _model_and_optimizer_state()
    meters = [
        (10, "loss", "AverageMeter",
         {"val": torch.tensor(2.5), "sum": torch.tensor(5.0), "count": 2, "round": 3}),
        (20, "score", "AverageMeter",
         {"val": np.float64(0.25), "sum": np.float64(0.75), "count": np.int64(3), "round": 4}),
        (90, "wps", "TimeMeter", {"init": 0.01, "n": np.float32(192.0), "round": 1}),
    ]
    return {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model_sd,
        "criterion": None,
        "optimizer_history": [{
            "criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion",
            "optimizer_name": "FairseqAdam",
            "lr_scheduler_state": {"best": np.float64(0.71)},
            "num_updates": 7,
        }],
        "task_state": {},
        "extra_state": {
            "metrics": collections.OrderedDict([("valid", meters)]),
            "previous_training_time": 12.5,
            "train_iterator": {"version": 2, "epoch": 3, "iterations_in_epoch": 0,
                               "shuffle": True},
            "val_loss": np.float64(0.71),
            "best": np.float64(0.71),
        },
        "last_optimizer_state": optim_sd,
    }


@pytest.fixture()
def fairseq_checkpoint(tmp_path, fairseq_args):
    path = str(tmp_path / "checkpoint_last.pt")
    checkpoint_utils.torch_persistent_save(trainer_state(fairseq_args), path)
    return path


def _check_loaded(state, reference):
    assert isinstance(state["cfg"], DictConfig)
    assert isinstance(state["cfg"].model, argparse.Namespace)
    assert state["cfg"].model.arch == "transformer"
    assert state["cfg"].task._name == "translation"
    assert list(state["cfg"].optimization.lr) == [0.0005]
    for key, tensor in reference["model"].items():
        assert torch.equal(state["model"][key], tensor)
    extra = state["extra_state"]
    assert extra["best"] == np.float64(0.71) and isinstance(extra["best"], np.float64)
    score = extra["metrics"]["valid"][1][3]
    assert isinstance(score["count"], np.int64) and score["sum"] == 0.75
    assert isinstance(extra["metrics"]["valid"][2][3]["n"], np.float32)
    assert extra["train_iterator"]["epoch"] == 3
    assert state["optimizer_history"][-1]["num_updates"] == 7
    exp_avg = state["last_optimizer_state"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, reference["last_optimizer_state"]["state"][0]["exp_avg"])


# ------------------------------------------------------------------------------- the hook
def test_import_installs_the_hook():
    assert checkpoint_utils.load_checkpoint_to_cpu is cs.load_checkpoint_to_cpu
    registered = torch.serialization.get_safe_globals()
    for entry in cs.SAFE_GLOBALS:
        assert entry in registered
    cs.install()  # idempotent
    assert checkpoint_utils.load_checkpoint_to_cpu is cs.load_checkpoint_to_cpu


EXPECTED_ALLOWLIST = {
    "argparse.Namespace",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode",
    "typing.Any", "builtins.dict", "builtins.list", "builtins.int", "collections.defaultdict",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype",
} | {
    f"numpy.dtypes.{type(np.dtype(t)).__qualname__}"
    for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "float32", "float64")
}


def test_allowlist_is_exactly_the_expected_set():
    assert set(cs.allowed_global_names()) == EXPECTED_ALLOWLIST
    for dangerous in ("builtins.eval", "builtins.exec", "builtins.getattr", "os.system",
                      "posix.system", "subprocess.Popen", "numpy.ndarray"):
        assert dangerous not in cs.allowed_global_names()


# ------------------------------------------------------------------ fairseq checkpoints load
def test_fairseq_load_checkpoint_to_cpu_loads_a_fairseq_checkpoint(fairseq_checkpoint,
                                                                     fairseq_args):
    reference = trainer_state(fairseq_args)
    _check_loaded(checkpoint_utils.load_checkpoint_to_cpu(fairseq_checkpoint), reference)
    _check_loaded(cs.load_checkpoint(fairseq_checkpoint), reference)
    # arg_overrides reach the cfg, as in fairseq
    state = checkpoint_utils.load_checkpoint_to_cpu(fairseq_checkpoint, {"data": "/elsewhere"})
    assert state["cfg"].task.data == "/elsewhere"
    # plain torch.load (weights_only by default) works too, with the allowlist in place
    assert torch.load(fairseq_checkpoint)["extra_state"]["val_loss"] == 0.71


def test_resaved_checkpoint_with_dictconfig_loads(fairseq_checkpoint, fairseq_args, tmp_path):
    """A state re-saved after load_checkpoint_to_cpu holds cfg as a DictConfig (how cleaned /
    released checkpoints are often made): OmegaConf containers, metadata, typing.Any, ..."""
    state = checkpoint_utils.load_checkpoint_to_cpu(fairseq_checkpoint)
    resaved = str(tmp_path / "resaved.pt")
    checkpoint_utils.torch_persistent_save(state, resaved)
    names = pickle_globals(resaved)
    for needed in ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
                   "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
                   "omegaconf.nodes.AnyNode", "typing.Any", "collections.defaultdict",
                   "builtins.dict", "builtins.list", "builtins.int", "argparse.Namespace",
                   "numpy._core.multiarray.scalar", "numpy.dtype"):
        assert needed in names, needed
    reference = trainer_state(fairseq_args)
    _check_loaded(checkpoint_utils.load_checkpoint_to_cpu(resaved), reference)
    _check_loaded(cs.load_checkpoint(resaved), reference)
    raw = cs.safe_torch_load(resaved)
    assert isinstance(raw["cfg"], DictConfig) and raw["cfg"].model.arch == "transformer"


def test_every_allowlisted_global_is_used_by_some_checkpoint(fairseq_checkpoint, tmp_path):
    """No entry is there 'just in case': each global name occurs in a fairseq checkpoint
    (numpy.core.* in numpy-1.x ones, see below; dtype classes are BUILD targets, not names)."""
    resaved = str(tmp_path / "resaved.pt")
    checkpoint_utils.torch_persistent_save(
        checkpoint_utils.load_checkpoint_to_cpu(fairseq_checkpoint), resaved)
    used = pickle_globals(fairseq_checkpoint) | pickle_globals(resaved)
    named = {n for n in EXPECTED_ALLOWLIST
             if not n.startswith(("numpy.dtypes.", "numpy.core."))}
    assert named <= used, named - used


@pytest.mark.parametrize("layout", ["args_and_extra_state", "pre_0.9"])
def test_legacy_checkpoint_with_argparse_args_loads(tmp_path, fairseq_args, layout):
    model_sd, optim_sd = _model_and_optimizer_state()
    args = argparse.Namespace(**vars(fairseq_args))
    if layout == "args_and_extra_state":
        state = {
            "args": args, "model": model_sd,
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion",
                                   "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": np.float64(1.5)},
                                   "num_updates": 11}],
            "extra_state": {"train_iterator": {"epoch": 2, "iterations_in_epoch": 0},
                            "val_loss": np.float64(1.5)},
            "last_optimizer_state": optim_sd,
        }
    else:  # fairseq < 0.9: optimizer and bookkeeping at top level
        state = {"args": args, "model": model_sd, "optimizer": optim_sd,
                 "best_loss": np.float64(1.5), "epoch": 2, "batch_offset": 0,
                 "val_loss": np.float64(1.5)}
    path = str(tmp_path / "legacy.pt")
    checkpoint_utils.torch_persistent_save(state, path)
    for load in (checkpoint_utils.load_checkpoint_to_cpu, cs.load_checkpoint):
        loaded = load(path)
        assert isinstance(loaded["args"], argparse.Namespace)
        assert loaded["cfg"].model.arch == "transformer"  # upgraded from args
        assert loaded["cfg"].task._name == "translation"
        assert loaded["extra_state"]["train_iterator"]["epoch"] == 2
        assert torch.equal(loaded["model"]["1.weight"], model_sd["1.weight"])


def test_numpy1_checkpoint_loads(tmp_path):
    """Checkpoints written under numpy 1.x name numpy.core.multiarray.scalar."""
    path = str(tmp_path / "np2.pt")
    torch.save({"model": {"w": torch.ones(2)},
                "extra_state": {"best": np.float64(0.5), "n": np.int64(4)}}, path)
    old = str(tmp_path / "np1.pt")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            dst.writestr(info, data)
    assert "numpy.core.multiarray.scalar" in pickle_globals(old)
    assert "numpy._core.multiarray.scalar" not in pickle_globals(old)
    for state in (cs.safe_torch_load(old), torch.load(old)):
        assert state["extra_state"]["best"] == 0.5
        assert isinstance(state["extra_state"]["n"], np.int64)


# ------------------------------------------------------------- anything else is refused
def _payloads(marker):
    cmd = f"touch {marker}"

    class OsSystem:
        def __reduce__(self):
            return (os.system, (cmd,))

    class Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["touch", str(marker)],))

    class Eval:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    return {
        "os.system": (OsSystem(), f"{os.name}.system", "os.system"),
        "subprocess.Popen": (Popen(), "Popen", "subprocess.Popen"),
        "eval": (Eval(), "eval", "builtins.eval"),
        "exec": (Exec(), "exec", "builtins.exec"),
    }


LOADERS = {
    "fairseq.load_checkpoint_to_cpu": lambda p: checkpoint_utils.load_checkpoint_to_cpu(p),
    "load_checkpoint": cs.load_checkpoint,
    "safe_torch_load": cs.safe_torch_load,
}


@pytest.mark.parametrize("payload", ["os.system", "subprocess.Popen", "eval", "exec"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_checkpoint_with_other_globals_is_refused(tmp_path, fairseq_args, payload, loader):
    marker = tmp_path / "PWNED"
    evil, name_part, friendly = _payloads(marker)[payload]
    state = trainer_state(fairseq_args)
    state["extra_state"]["evil"] = evil  # hidden in an otherwise genuine fairseq checkpoint
    path = str(tmp_path / "evil.pt")
    checkpoint_utils.torch_persistent_save(state, path)

    with pytest.raises(cs.UnsafeCheckpointError) as info:
        LOADERS[loader](path)
    message = str(info.value)
    assert path in message
    assert name_part in message and friendly in message
    assert any(name_part in g for g in info.value.globals)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_refusal_holds_with_torch_env_override(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns off weights_only where a call leaves it unset;
    our loaders set it explicitly, so the env var cannot switch the check off."""
    marker = tmp_path / "PWNED"
    evil, _, _ = _payloads(marker)["os.system"]
    path = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "evil": evil}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for loader in LOADERS.values():
        with pytest.raises(cs.UnsafeCheckpointError, match="system"):
            loader(path)
    assert not marker.exists()
    # and plain torch.load (weights_only by default) refuses it too, without the env var
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not marker.exists()


def test_non_allowlisted_numpy_types_are_refused(tmp_path):
    """numpy arrays and object dtypes are not on the list (no fairseq checkpoint needs them)."""
    for i, value in enumerate((np.zeros(3), np.dtype(object), np.str_("x"))):
        path = str(tmp_path / f"np{i}.pt")
        torch.save({"x": value}, path)
        with pytest.raises(cs.UnsafeCheckpointError) as info:
            cs.safe_torch_load(path)
        assert info.value.globals, str(info.value)


def test_other_load_errors_pass_through(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError):
        cs.load_checkpoint(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(pickle.UnpicklingError) as info:
        cs.safe_torch_load(str(garbage))
    assert not isinstance(info.value, cs.UnsafeCheckpointError)


# ------------------------------------------------------------------------ the real CLIs
def test_fairseq_cli_restore_and_generate_with_user_dir(tmp_path, repo_root):
    """fairseq-train --restore-file and fairseq-generate --path load a real fairseq
    checkpoint once --user-dir mue_fairseq is given; stock fairseq alone refuses it."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "checkpoint_cli_driver.py"), str(tmp_path / "w")],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["stock_fairseq"] == "refused"
    assert result["patched"] == "mue_fairseq.checkpoint_safety"
    assert len(result["restored"]) == 1 and "@ 1 updates" in result["restored"][0], result
    assert result["next_epoch"] == 3
    assert result["hypotheses"] == 4
