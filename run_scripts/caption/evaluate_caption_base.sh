#!/usr/bin/env bash
# Evaluate a MuE caption checkpoint (OFA's evaluate_caption_base.sh) with early exits at the
# paper's settings: encoder thresholds image 0.9 / text 0.95, decoder similarity threshold
# decaying over the generation steps (Eq. 11) with theta 0.99, beta 0.95, tau 1.
#
#   bash evaluate_caption_base.sh                # MUE=0 for the full-depth baseline
#
# Writes ${RESULT_PATH}/test_predict.json, test_metrics.json (BLEU-1..4, METEOR, ROUGE-L,
# CIDEr and, when Stanford CoreNLP is installed for pycocoevalcap, SPICE; plus the expected
# time reduction) and test_exit_stats.json. The references are those of the TSV (the
# &&-joined caption column), scored as OFA's coco_eval.py scores them.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${SCRIPT_DIR}/../common.sh"

# ---- inputs and outputs
DATA_DIR=${DATA_DIR:-../../dataset/caption_data}
DATA=${DATA:-${DATA_DIR}/caption_test.tsv}
SPLIT=${SPLIT:-test}
BPE_DIR=${BPE_DIR:-../../utils/BPE}
CHECKPOINT=${CHECKPOINT:-../../checkpoints/caption_base_mue_best.pt}
RESULT_PATH=${RESULT_PATH:-../../results/caption_mue}
GPUS=${GPUS:-4}
MASTER_PORT=${MASTER_PORT:-1091}
FP16=${FP16---fp16}                  # FP16= (empty) for float32; ignored on CPU
BATCH_SIZE=${BATCH_SIZE:-16}
SELECTED_COLS=${SELECTED_COLS:-1,4,2}
BEAM=${BEAM:-5}
MAX_LEN_B=${MAX_LEN_B:-16}
NO_REPEAT_NGRAM_SIZE=${NO_REPEAT_NGRAM_SIZE:-3}

# ---- early exits (paper §4): MUE=0 evaluates at full depth
MUE=${MUE:-1}
IMAGE_EXIT_THRESHOLD=${IMAGE_EXIT_THRESHOLD:-0.9}
TEXT_EXIT_THRESHOLD=${TEXT_EXIT_THRESHOLD:-0.95}
DECAY_THETA=${DECAY_THETA:-0.99}
DECAY_BETA=${DECAY_BETA:-0.95}
DECAY_TAU=${DECAY_TAU:-1}
if [ "${MUE}" = 1 ]; then
  EXIT_ARGS="--encoder-exit --image-exit-threshold=${IMAGE_EXIT_THRESHOLD} --text-exit-threshold=${TEXT_EXIT_THRESHOLD}
    --decoder-exit-policy=similarity --decoder-threshold-decay
    --decay-theta=${DECAY_THETA} --decay-beta=${DECAY_BETA} --decay-tau=${DECAY_TAU}"
else
  EXIT_ARGS=""
fi

require_file "evaluation data (DATA)" "${DATA}"
require_bpe_dir "${BPE_DIR}"
require_file "checkpoint (CHECKPOINT)" "${CHECKPOINT}"
command -v torchrun >/dev/null || die "torchrun not found (it comes with torch)"
command -v java >/dev/null || die "java not found: pycocoevalcap's PTB tokenizer and METEOR need it"
find_user_dir

# shellcheck disable=SC2086  # FP16 and EXIT_ARGS hold several options
torchrun --nproc_per_node="${GPUS}" --master_port="${MASTER_PORT}" -m mue_fairseq.evaluate \
    "${DATA}" \
    --path="${CHECKPOINT}" \
    --user-dir="${USER_DIR}" \
    --task=caption \
    --batch-size="${BATCH_SIZE}" \
    --log-format=simple --log-interval=10 \
    --seed=7 \
    --gen-subset="${SPLIT}" \
    --results-path="${RESULT_PATH}" \
    --bpe-dir="${BPE_DIR}" \
    --selected-cols="${SELECTED_COLS}" \
    --beam="${BEAM}" \
    --max-len-b="${MAX_LEN_B}" \
    --no-repeat-ngram-size="${NO_REPEAT_NGRAM_SIZE}" \
    ${EXIT_ARGS} \
    ${FP16} \
    --num-workers=0
