"""Safe loading of fairseq / OFA checkpoints under ``torch.load(weights_only=True)``.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``: it unpickles only tensors,
containers and primitives, plus globals put on an allowlist with
``torch.serialization.add_safe_globals``. fairseq/OFA checkpoints also hold a few harmless
Python objects, so loading them fails unless those are allowlisted. This module allowlists
exactly the globals such checkpoints need (:data:`SAFE_GLOBALS`, each entry explained there)
and nothing else; there is no ``weights_only=False`` fallback and no switch to turn the check
off. A checkpoint that names any other global (``os.system`` via ``__reduce__``, say) is
refused with :class:`UnsafeCheckpointError` before anything in it runs.

:func:`install` (run by ``import mue_fairseq``, hence by ``--user-dir mue_fairseq``)

* registers :data:`SAFE_GLOBALS` with torch, so any default ``torch.load`` of such a
  checkpoint in this process works;
* replaces ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (used by ``fairseq-train
  --restore-file``/``--finetune-from-model``, ``fairseq-generate --path``,
  ``load_model_ensemble*`` and hub loading) by :func:`load_checkpoint_to_cpu`, which passes
  ``weights_only=True`` explicitly (so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot switch
  the check off) and turns a refusal into :class:`UnsafeCheckpointError`.

Project code loads checkpoints with :func:`load_checkpoint`.
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

__all__ = [
    "SAFE_GLOBALS",
    "UnsafeCheckpointError",
    "allowed_global_names",
    "install",
    "load_checkpoint",
    "load_checkpoint_to_cpu",
    "safe_torch_load",
]

_SafeGlobal = Union[Any, Tuple[Any, str]]

# numpy's scalar reconstructor lives in numpy._core.multiarray since numpy 2; checkpoints
# written under numpy 1.x (every released OFA checkpoint) name it numpy.core.multiarray.scalar.
# Both names are registered explicitly, whichever numpy runs here.
try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _np_scalar

# numpy dtype classes of the numeric scalars that metric code logs (np.float64 from CIDEr,
# np.int64 counts, ...). Unpickling a dtype ends in BUILD on the dtype instance, which
# weights_only allows only for allowlisted types. Object/str/void/datetime dtypes stay out.
_NUMPY_SCALAR_DTYPES = tuple(
    dict.fromkeys(  # dedupe aliases (Int64DType is LongDType on Linux, ...)
        getattr(np.dtypes, name)
        for name in (
            "BoolDType",
            "Int8DType", "Int16DType", "Int32DType", "Int64DType",
            "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType",
            "Float16DType", "Float32DType", "Float64DType",
        )
    )
)

#: Globals that fairseq/OFA checkpoints need beyond torch's own weights_only set.
#: Every entry is a plain data holder or a constructor of one; none runs user code.
SAFE_GLOBALS: Tuple[_SafeGlobal, ...] = (
    # state["args"] of legacy checkpoints, and cfg["model"] of any model registered the
    # legacy way (register_model_architecture + add_args, as OFA's are): fairseq stores the
    # argparse namespace itself inside cfg.
    argparse.Namespace,
    # cfg saved as an OmegaConf container (a state re-saved after load_checkpoint_to_cpu,
    # which turns cfg into a DictConfig): the containers, their metadata, and the node type
    # that wraps every value of an untyped config.
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    # ... which name typing.Any as ref/key/element type, builtins.dict/list as object_type,
    # builtins.int as a ListConfig key_type, and hold Metadata.resolver_cache, a
    # collections.defaultdict(dict).
    typing.Any,
    dict,
    list,
    int,
    collections.defaultdict,
    # numpy scalars in extra_state (metric sums, "best"/"val_loss" from numpy scores):
    # np.float64(x) pickles as scalar(np.dtype("f8"), raw_bytes).
    (_np_scalar, "numpy._core.multiarray.scalar"),
    (_np_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *_NUMPY_SCALAR_DTYPES,
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint names a global that is not on the allowlist; it was not loaded.

    Subclass of :class:`pickle.UnpicklingError` (what ``torch.load`` raises for such files),
    so existing handlers still catch it. ``path`` is the file, ``globals`` the offending
    global names (fully qualified, e.g. ``posix.system``).
    """

    def __init__(self, path: str, globals_: Sequence[str], detail: str = ""):
        self.path = str(path)
        self.globals = list(globals_)
        names = ", ".join(self.globals) if self.globals else "an unsupported object"
        msg = (
            f"Refusing to load checkpoint {self.path!r}: it references {names}, outside the "
            "globals allowed in fairseq/OFA checkpoints "
            "(mue_fairseq.checkpoint_safety.SAFE_GLOBALS). Nothing in the file was executed."
        )
        if detail:
            msg += f"\nUnpickler said: {detail}"
        super().__init__(msg)


def _global_name(entry: _SafeGlobal) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def allowed_global_names() -> List[str]:
    """Names (module.qualname) this module adds to torch's weights_only allowlist."""
    return sorted({_global_name(e) for e in SAFE_GLOBALS})


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")
_BUILD_RE = re.compile(r"but got <class '([\w.]+)'>")
_REDUCE_RE = re.compile(r"unrecognized function ([\w.<>]+)")
# pickle writes a few globals under their Python 2 / platform module names.
_MODULE_ALIASES = {"posix": "os", "nt": "os", "commands": "subprocess", "__builtin__": "builtins"}


def _with_alias(name: str) -> str:
    module, _, attr = name.rpartition(".")
    alias = _MODULE_ALIASES.get(module)
    return f"{name} ({alias}.{attr})" if alias else name


def _offending_globals(message: str, source: Any) -> List[str]:
    """Offending globals: a scan of the file's pickle (fully qualified names, nothing is
    unpickled), completed by what torch's message names."""
    found: List[str] = []
    if isinstance(source, (str, os.PathLike)):
        try:
            found.extend(torch.serialization.get_unsafe_globals_in_checkpoint(source))
        except Exception:  # not a zip checkpoint, unreadable, ...: the message is enough
            pass
    for regex in (_GLOBAL_RE, _BUILD_RE, _REDUCE_RE):
        for name in regex.findall(message):
            if not any(f == name or f.endswith("." + name) for f in found):
                found.append(name)
    return [_with_alias(name) for name in dict.fromkeys(found)]


def _is_weights_only_error(exc: BaseException) -> bool:
    text = str(exc)
    return "Weights only load failed" in text or "WeightsUnpickler error" in text


def _unpickler_detail(text: str) -> str:
    """The specific part of torch's weights_only error, without its generic advice."""
    text = text.split("Check the documentation of torch.load")[0]
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif "trusted source." in text:
        text = text.split("trusted source.", 1)[1]
    text = text.split("Please use `torch.serialization.add_safe_globals")[0]
    return " ".join(text.split())


def safe_torch_load(f: Any, map_location: Any = "cpu", *, path: Optional[str] = None) -> Any:
    """``torch.load(f, map_location, weights_only=True)`` with the allowlist installed.

    ``f`` is a path or a binary file object; ``path`` names it in errors when ``f`` is a
    file object. Raises :class:`UnsafeCheckpointError` if the file needs any global outside
    torch's own set and :data:`SAFE_GLOBALS`; other weights_only refusals (a corrupt file,
    an opcode the restricted unpickler does not support) stay torch's UnpicklingError.
    """
    install_safe_globals()
    if path is None:
        path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", repr(f))
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if isinstance(exc, UnsafeCheckpointError) or not _is_weights_only_error(exc):
            raise
        text = str(exc)
        offending = _offending_globals(text, path)
        if not offending:  # corrupt or unsupported file rather than a foreign global
            raise
        raise UnsafeCheckpointError(path, offending, _unpickler_detail(text)) from None


def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
    """Drop-in for ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (same signature and
    result) that reads the file with :func:`safe_torch_load`.

    Mirrors fairseq 0.12's function: fetch through PathManager, apply ``arg_overrides`` to a
    legacy ``args`` namespace and/or the ``cfg`` (re-created as a DictConfig that allows
    objects, since cfg.model can be an argparse.Namespace), then upgrade old layouts.
    """
    from fairseq.checkpoint_utils import _upgrade_state_dict
    from fairseq.dataclass.utils import overwrite_args_by_name
    from fairseq.file_io import PathManager
    from omegaconf import OmegaConf

    local_path = PathManager.get_local_path(path)
    # A cached copy of a remote file may be stale: drop it and fetch again (as fairseq does).
    if local_path != path and PathManager.path_requires_pathmanager(path):
        try:
            os.remove(local_path)
        except FileNotFoundError:
            pass
        if load_on_all_ranks:
            torch.distributed.barrier()
        local_path = PathManager.get_local_path(path)

    with open(local_path, "rb") as f:
        state = safe_torch_load(f, map_location=torch.device("cpu"), path=local_path)

    if "args" in state and state["args"] is not None and arg_overrides is not None:
        args = state["args"]
        for arg_name, arg_val in arg_overrides.items():
            setattr(args, arg_name, arg_val)

    if "cfg" in state and state["cfg"] is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)

    return _upgrade_state_dict(state)


def load_checkpoint(path, arg_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load a fairseq/OFA checkpoint onto the CPU, safely; the project's loader.

    Returns fairseq's upgraded state dict (``cfg`` as a DictConfig, ``model`` state dict,
    ``extra_state``, ...). Raises :class:`UnsafeCheckpointError` for a file that needs any
    global outside the allowlist.
    """
    return load_checkpoint_to_cpu(os.fspath(path), arg_overrides=arg_overrides)


_installed = {"globals": False, "fairseq": False}


def install_safe_globals() -> None:
    """Register :data:`SAFE_GLOBALS` with torch (idempotent)."""
    if not _installed["globals"]:
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
        _installed["globals"] = True


def install() -> None:
    """Allowlist the checkpoint globals and route fairseq's checkpoint loading through
    :func:`load_checkpoint_to_cpu` (idempotent). Run by ``import mue_fairseq``."""
    install_safe_globals()
    if _installed["fairseq"]:
        return
    from fairseq import checkpoint_utils

    # fairseq (trainer, load_model_ensemble_and_task, generate, hub) looks the function up
    # on the module at call time, so replacing the module attribute covers every caller.
    if getattr(checkpoint_utils.load_checkpoint_to_cpu, "__module__", "") != __name__:
        load_checkpoint_to_cpu.__wrapped_fairseq__ = checkpoint_utils.load_checkpoint_to_cpu
        checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    _installed["fairseq"] = True
