"""Packaging and namespacing: everything lives under ``mue_fairseq``, in a source checkout and
installed, and ``--user-dir mue_fairseq`` works in both layouts."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

SOURCES = ("setup.py", "pyproject.toml", "README.md", "mue_fairseq", "tasks", "criterions")
MAPPED = {"mue_fairseq": "mue_fairseq", "tasks": "mue_fairseq/tasks",
          "criterions": "mue_fairseq/criterions"}


def _env(**extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def _run_python(code, cwd, timeout=180, **env):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# Run fairseq-train's entry point with `--user-dir mue_fairseq --help`, with sys.path as the
# console script has it (no cwd entry), then report what got imported.
USER_DIR_PROBE = """
    import json, os, sys
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)
    sys.argv = ["fairseq-train", "--user-dir", "mue_fairseq", "--help"]
    from fairseq_cli.train import cli_main
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()) as help_text:
        try:
            cli_main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
    import mue_fairseq
    print("RESULT " + json.dumps({
        "rc": code,
        "help_has_user_dir": "--user-dir" in help_text.getvalue(),
        "package": os.path.realpath(os.path.dirname(mue_fairseq.__file__)),
        "tasks": os.path.realpath(mue_fairseq.tasks.__file__),
        "top_level": sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "criterions")),
    }))
"""


def test_import_keeps_tasks_and_criterions_namespaced(repo_root, tmp_path):
    """With an OFA-like checkout (own top-level `tasks`/`criterions`) and the repo root on
    sys.path, `import mue_fairseq` creates no top-level `tasks`/`criterions` module and
    leaves OFA's packages importable as they are."""
    ofa = tmp_path / "ofa_checkout"
    for name in ("tasks", "criterions"):
        (ofa / name).mkdir(parents=True)
        (ofa / name / "__init__.py").write_text(f"OFA_{name.upper()} = True\n")
    result = _run_python(
        """
        import json, os, sys
        import mue_fairseq
        from fairseq import checkpoint_utils
        top = sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "criterions"))
        info = {
            "top_level": top,
            "tasks": mue_fairseq.tasks.__file__,
            "criterions": mue_fairseq.criterions.__file__,
            "same_object": sys.modules["mue_fairseq.tasks"] is mue_fairseq.tasks,
            "task_modules": sorted(m for m in sys.modules if m.startswith("mue_fairseq.tasks.")),
            "criterion_modules": sorted(
                m for m in sys.modules if m.startswith("mue_fairseq.criterions.")),
            "hook": checkpoint_utils.load_checkpoint_to_cpu.__module__,
        }
        import tasks, criterions   # the OFA checkout's packages are untouched
        info["ofa_tasks"] = getattr(tasks, "OFA_TASKS", False)
        info["ofa_criterions"] = getattr(criterions, "OFA_CRITERIONS", False)
        print("RESULT " + json.dumps(info))
        """,
        cwd=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ofa), repo_root]),
    )
    assert result["top_level"] == []
    assert result["tasks"] == os.path.join(repo_root, "tasks", "__init__.py")
    assert result["criterions"] == os.path.join(repo_root, "criterions", "__init__.py")
    assert result["same_object"]
    assert result["hook"] == "mue_fairseq.checkpoint_safety"
    # every module of tasks/ and criterions/ was imported (their registrations ran)
    for folder, key in (("tasks", "task_modules"), ("criterions", "criterion_modules")):
        expected = {f"mue_fairseq.{folder}.{os.path.basename(p)[:-3]}"
                    for p in glob.glob(os.path.join(repo_root, folder, "[!_]*.py"))}
        assert expected <= set(result[key])
    assert result["ofa_tasks"] and result["ofa_criterions"]


def test_user_dir_from_source_checkout(repo_root):
    result = _run_python(USER_DIR_PROBE, cwd=repo_root)
    assert result["rc"] == 0 and result["help_has_user_dir"]
    assert result["package"] == os.path.realpath(os.path.join(repo_root, "mue_fairseq"))
    assert result["top_level"] == []


@pytest.fixture(scope="module")
def wheel(repo_root, tmp_path_factory):
    """Build the wheel from a copy of the sources (offline: --no-build-isolation)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = os.path.join(repo_root, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(base / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (path,) = glob.glob(str(base / "dist" / "mue_fairseq-*.whl"))
    return path


def test_wheel_installs_only_under_mue_fairseq(wheel):
    sources = os.path.join(os.path.dirname(os.path.dirname(wheel)), "src")  # what was built
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = {n.split("/")[0] for n in names}
        metadata = z.read(f"{dist_info}/METADATA").decode()
        top_level_txt = (z.read(f"{dist_info}/top_level.txt").decode().split()
                         if f"{dist_info}/top_level.txt" in names else ["mue_fairseq"])
    assert top_level == {"mue_fairseq", dist_info}
    assert top_level_txt == ["mue_fairseq"]
    assert not any(n.startswith(("tasks/", "criterions/")) for n in names)
    # every Python file of the three source folders ships, at its namespaced place
    for folder, target in MAPPED.items():
        for path in glob.glob(os.path.join(sources, folder, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, os.path.join(sources, folder)).replace(os.sep, "/")
            assert f"{target}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    assert "mue_fairseq/tasks/__init__.py" in names
    assert "mue_fairseq/criterions/__init__.py" in names
    assert "Requires-Python: ~=3.11" in metadata
    for pin in ("torch==2.13.0", "ve-fairseq==0.12.3"):
        assert f"Requires-Dist: {pin}" in metadata


def test_user_dir_from_installed_layout(wheel, tmp_path):
    """fairseq resolves `--user-dir mue_fairseq` (from a cwd without it) to
    `<dir of fairseq>/../mue_fairseq`: lay the wheel out next to a fairseq package the way
    site-packages has them and run fairseq-train from elsewhere."""
    import fairseq

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # A real folder `fairseq` whose entries link to the installed one: fairseq's
    # `dirname(__file__)/..` must be `site`, which a symlinked folder would not give.
    real = os.path.dirname(fairseq.__file__)
    (site / "fairseq").mkdir()
    for entry in os.listdir(real):
        if entry != "__pycache__":
            os.symlink(os.path.join(real, entry), site / "fairseq" / entry)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run_python(USER_DIR_PROBE, cwd=str(elsewhere), PYTHONPATH=str(site))
    assert result["rc"] == 0 and result["help_has_user_dir"]
    assert result["package"] == os.path.realpath(site / "mue_fairseq")
    assert result["tasks"] == os.path.realpath(site / "mue_fairseq" / "tasks" / "__init__.py")
    assert result["top_level"] == []


def _installed_next_to_fairseq():
    import fairseq

    path = os.path.join(os.path.dirname(os.path.dirname(fairseq.__file__)), "mue_fairseq")
    return path if os.path.isfile(os.path.join(path, "__init__.py")) else None


@pytest.mark.skipif(_installed_next_to_fairseq() is None,
                    reason="mue_fairseq is not pip-installed next to fairseq (CI installs it)")
def test_user_dir_from_real_install(tmp_path):
    result = _run_python(USER_DIR_PROBE, cwd=str(tmp_path))
    assert result["rc"] == 0 and result["help_has_user_dir"]
    assert result["package"] == os.path.realpath(_installed_next_to_fairseq())
    assert result["top_level"] == []
