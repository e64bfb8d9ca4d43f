#!/usr/bin/env bash
# Evaluate a MuE SNLI-VE checkpoint (OFA's evaluate_snli_ve_base.sh) with early exits at the
# paper's thresholds: image 0.9 and text 0.95 in the encoder, 0.95 in the decoder.
#
#   bash evaluate_snli_ve_base.sh dev|test       # MUE=0 for the full-depth baseline
#
# Writes ${RESULT_PATH}/{SPLIT}_predict.json, {SPLIT}_metrics.json (accuracy, expected time
# reduction) and {SPLIT}_exit_stats.json; prints the exit summary and the metrics.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${SCRIPT_DIR}/../common.sh"

SPLIT=${1:-${SPLIT:-}}
[ "${SPLIT}" = dev ] || [ "${SPLIT}" = test ] || die "usage: $0 dev|test"

# ---- inputs and outputs
DATA_DIR=${DATA_DIR:-../../dataset/snli_ve_data}
DATA=${DATA:-${DATA_DIR}/snli_ve_${SPLIT}.tsv}
BPE_DIR=${BPE_DIR:-../../utils/BPE}
CHECKPOINT=${CHECKPOINT:-../../checkpoints/snli_ve_base_mue_best.pt}
RESULT_PATH=${RESULT_PATH:-../../results/snli_ve_mue}
GPUS=${GPUS:-8}
MASTER_PORT=${MASTER_PORT:-7091}
FP16=${FP16---fp16}                  # FP16= (empty) for float32; ignored on CPU
BATCH_SIZE=${BATCH_SIZE:-8}
SELECTED_COLS=${SELECTED_COLS:-0,2,3,4,5}

# ---- early exits (paper §4): MUE=0 evaluates at full depth
MUE=${MUE:-1}
IMAGE_EXIT_THRESHOLD=${IMAGE_EXIT_THRESHOLD:-0.9}
TEXT_EXIT_THRESHOLD=${TEXT_EXIT_THRESHOLD:-0.95}
DECODER_EXIT_THRESHOLD=${DECODER_EXIT_THRESHOLD:-0.95}
if [ "${MUE}" = 1 ]; then
  EXIT_ARGS="--encoder-exit --image-exit-threshold=${IMAGE_EXIT_THRESHOLD} --text-exit-threshold=${TEXT_EXIT_THRESHOLD}
    --decoder-exit-policy=similarity --decoder-exit-threshold=${DECODER_EXIT_THRESHOLD}"
else
  EXIT_ARGS=""
fi

require_file "evaluation data (DATA)" "${DATA}"
require_bpe_dir "${BPE_DIR}"
require_file "checkpoint (CHECKPOINT)" "${CHECKPOINT}"
command -v torchrun >/dev/null || die "torchrun not found (it comes with torch)"
find_user_dir

# shellcheck disable=SC2086  # FP16 and EXIT_ARGS hold several options
torchrun --nproc_per_node="${GPUS}" --master_port="${MASTER_PORT}" -m mue_fairseq.evaluate \
    "${DATA}" \
    --path="${CHECKPOINT}" \
    --user-dir="${USER_DIR}" \
    --task=snli_ve \
    --batch-size="${BATCH_SIZE}" \
    --log-format=simple --log-interval=10 \
    --seed=7 \
    --gen-subset="${SPLIT}" \
    --results-path="${RESULT_PATH}" \
    --bpe-dir="${BPE_DIR}" \
    --selected-cols="${SELECTED_COLS}" \
    ${EXIT_ARGS} \
    ${FP16} \
    --num-workers=0
