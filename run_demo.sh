#!/usr/bin/env bash
# The main job on a fresh machine: install the project (CPU torch first, so nothing pulls a CUDA
# build), then run the embedded-task demo (python -m mue_fairseq.demo; arguments pass through,
# e.g. --full for the ablations). About 15 minutes on 2 CPU cores; results in ./results/.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0
python -m pip install -q '.[test]'
exec python -m mue_fairseq.demo "$@"
