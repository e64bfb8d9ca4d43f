"""Packaging for mue_fairseq.

Everything installs under the ``mue_fairseq`` namespace: the top-level source folders
``tasks/`` and ``criterions/`` become ``mue_fairseq.tasks`` and ``mue_fairseq.criterions``
(``package_dir`` below). Nothing installs as top-level ``tasks``/``criterions``: OFA checkouts,
which users keep on their path, own those names.
"""
from setuptools import find_namespace_packages, setup

# Folders outside mue_fairseq/ that install inside it: source folder -> package name.
_MAPPED = {"tasks": "mue_fairseq.tasks", "criterions": "mue_fairseq.criterions"}

# Namespace discovery, so a subfolder still being written without __init__.py ships too.
_SKIP = ["__pycache__", "*.__pycache__"]
packages = find_namespace_packages(include=["mue_fairseq", "mue_fairseq.*"], exclude=_SKIP)
package_dir = {}
for folder, package in _MAPPED.items():
    package_dir[package] = folder
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_namespace_packages(where=folder, exclude=_SKIP)]

setup(
    name="mue_fairseq",
    version="0.1.0",
    description="OFA with MuE early exiting (You Need Multiple Exiting), as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=packages,
    package_dir=package_dir,
    # Small data files that modules read at run time (vocabularies, configs).
    package_data={"": ["*.json", "*.yaml", "*.yml", "*.txt", "*.tsv"]},
    python_requires="~=3.11",
    install_requires=[
        # Exact pins where behaviour depends on them. torch==2.13.0 must be installed first
        # from the CPU wheel (.ci/run does): a bare "torch" would pull a CUDA build.
        "torch==2.13.0",
        # fairseq 0.12.2 does not install on Python 3.11; ve-fairseq 0.12.3 is a
        # Python 3.11 build of the same code (import name fairseq).
        "ve-fairseq==0.12.3",
        "omegaconf>=2.1,<2.4",
        "hydra-core>=1.3,<1.4",
        "pillow",
        "numpy>=1.25",  # numpy.dtypes (checkpoint_safety allowlist)
        "pycocoevalcap",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={
        # setuptools: tests build the wheel offline (--no-build-isolation).
        "test": ["pytest", "setuptools>=70.1"],
    },
    entry_points={"console_scripts": ["mue-evaluate = mue_fairseq.evaluate:cli_main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
