"""mue_fairseq: OFA with MuE early exiting, as a fairseq plugin (``--user-dir mue_fairseq``).

Importing this package

1. allowlists the globals that fairseq/OFA checkpoints need for ``torch.load(weights_only=True)``
   and routes fairseq's checkpoint loading through the safe loader (see checkpoint_safety);
2. imports ``mue_fairseq.models``, ``mue_fairseq.tasks`` and ``mue_fairseq.criterions`` and
   every module in them, so their fairseq registrations run.

Where the tasks and criterions live: in a source checkout they are the top-level folders
``tasks/`` and ``criterions/`` next to this package; they are loaded here under the names
``mue_fairseq.tasks`` / ``mue_fairseq.criterions`` and never as top-level ``tasks`` /
``criterions`` (OFA checkouts on the path own those names). An installed copy has them inside
the package (setup.py maps the folders there), so ordinary imports find them.
"""
import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)

# Subpackages that hold fairseq registrations, in import order.
_REGISTERING_SUBPACKAGES = ("models", "optim", "tasks", "criterions")
# Of those, the ones that sit outside the package in a source checkout.
_SIBLING_FOLDERS = ("tasks", "criterions")


def _is_source_checkout() -> bool:
    return os.path.isfile(os.path.join(_REPO_ROOT, "setup.py")) and not os.path.isdir(
        os.path.join(_PACKAGE_DIR, "tasks")
    )


def _load_sibling_package(name: str):
    """Load ``<repo>/<name>/`` as ``mue_fairseq.<name>`` (source checkout only)."""
    full_name = f"{__name__}.{name}"
    if full_name in sys.modules:
        return sys.modules[full_name]
    folder = os.path.join(_REPO_ROOT, name)
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return None
    spec = importlib.util.spec_from_file_location(
        full_name, init, submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(full_name, None)
        raise
    setattr(sys.modules[__name__], name, module)
    return module


def _subpackage_dir(name: str):
    """Folder of subpackage ``name`` in this layout, or None if it does not exist (yet)."""
    inside = os.path.join(_PACKAGE_DIR, name)
    if os.path.isdir(inside):
        return inside
    if name in _SIBLING_FOLDERS and _is_source_checkout():
        outside = os.path.join(_REPO_ROOT, name)
        if os.path.isfile(os.path.join(outside, "__init__.py")):
            return outside
    return None


def _import_all(package_name: str, folder: str) -> None:
    """Import every module of a subpackage the way fairseq's import_tasks/import_models do:
    each ``*.py`` file and each folder whose name does not start with ``_`` or ``.``."""
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith(("_", ".")):
            continue
        if entry.endswith(".py"):
            importlib.import_module(f"{package_name}.{entry[:-3]}")
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            importlib.import_module(f"{package_name}.{entry}")


def _register_all() -> None:
    for name in _REGISTERING_SUBPACKAGES:
        folder = _subpackage_dir(name)
        if folder is None:  # not written yet: nothing to register
            continue
        package_name = f"{__name__}.{name}"
        if name in _SIBLING_FOLDERS and not folder.startswith(_PACKAGE_DIR + os.sep):
            _load_sibling_package(name)
        else:
            importlib.import_module(package_name)
        _import_all(package_name, folder)


from . import checkpoint_safety  # noqa: E402

checkpoint_safety.install()
_register_all()
