#!/usr/bin/env bash
# MuE fine-tuning of OFA-base on SNLI-VE: OFA's train_snli_ve_base.sh with stock fairseq-train
# and --user-dir mue_fairseq, the MuE paper's hyperparameters (Adam, lr 3e-5, weight decay
# 0.01, total batch 64, 5 epochs), modality decomposition and the layer-wise task loss.
#
#   bash train_snli_ve_base.sh                 # paths below, relative to this folder
#   DATA_DIR=/data/snli_ve GPUS=4 bash train_snli_ve_base.sh
#
# Every variable in the two blocks below can be set from the environment.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${SCRIPT_DIR}/../common.sh"

# ---- inputs and outputs
DATA_DIR=${DATA_DIR:-../../dataset/snli_ve_data}
TRAIN_FILE=${TRAIN_FILE:-${DATA_DIR}/snli_ve_train.tsv}
VALID_FILE=${VALID_FILE:-${DATA_DIR}/snli_ve_dev.tsv}
BPE_DIR=${BPE_DIR:-../../utils/BPE}
RESTORE_FILE=${RESTORE_FILE:-../../checkpoints/ofa_base.pt}   # OFA's pre-trained OFA-base
SAVE_DIR=${SAVE_DIR:-./checkpoints/snli_ve_base_mue}
LOG_DIR=${LOG_DIR:-./logs}
GPUS=${GPUS:-8}                       # processes (GPUs) on this node, via torchrun
MASTER_PORT=${MASTER_PORT:-7061}
FP16=${FP16---fp16 --fp16-scale-window=512}   # FP16= (empty) for float32

# ---- hyperparameters (paper §4 / Appendix; the rest OFA's train_snli_ve_base.sh)
ARCH=${ARCH:-ofa_base}
LR=${LR:-3e-5}
MAX_EPOCH=${MAX_EPOCH:-5}
WARMUP_RATIO=${WARMUP_RATIO:-0.06}
TOTAL_BATCH=${TOTAL_BATCH:-64}        # = BATCH_SIZE x GPUS x update_freq
BATCH_SIZE=${BATCH_SIZE:-8}           # per GPU
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.0}
RESNET_DROP_PATH_RATE=${RESNET_DROP_PATH_RATE:-0.0}
ENCODER_DROP_PATH_RATE=${ENCODER_DROP_PATH_RATE:-0.1}
DECODER_DROP_PATH_RATE=${DECODER_DROP_PATH_RATE:-0.1}
DROPOUT=${DROPOUT:-0.1}
ATTENTION_DROPOUT=${ATTENTION_DROPOUT:-0.0}
MAX_SRC_LENGTH=${MAX_SRC_LENGTH:-80}
MAX_TGT_LENGTH=${MAX_TGT_LENGTH:-20}
NUM_BINS=${NUM_BINS:-1000}
PATCH_IMAGE_SIZE=${PATCH_IMAGE_SIZE:-480}
PROMPT_TYPE=${PROMPT_TYPE:-prev_output}
SELECTED_COLS=${SELECTED_COLS:-0,2,3,4,5}

# ---- checks: every input must exist before anything starts
require_file "training data (TRAIN_FILE)" "${TRAIN_FILE}"
require_file "validation data (VALID_FILE)" "${VALID_FILE}"
require_bpe_dir "${BPE_DIR}"
require_file "checkpoint to fine-tune (RESTORE_FILE)" "${RESTORE_FILE}"
command -v fairseq-train >/dev/null || die "fairseq-train not found: pip install ve-fairseq==0.12.3"
command -v torchrun >/dev/null || die "torchrun not found (it comes with torch)"
find_user_dir
UPDATE_FREQ=$(total_batch_to_update_freq "${TOTAL_BATCH}" "${BATCH_SIZE}" "${GPUS}")

mkdir -p "${SAVE_DIR}" "${LOG_DIR}"
LOG_FILE=${LOG_FILE:-${LOG_DIR}/snli_ve_base_mue_${MAX_EPOCH}_${LR}.log}
echo "training; log: ${LOG_FILE}, checkpoints: ${SAVE_DIR}"

# shellcheck disable=SC2086  # FP16 holds several options
torchrun --nproc_per_node="${GPUS}" --master_port="${MASTER_PORT}" --no-python fairseq-train \
    "${TRAIN_FILE},${VALID_FILE}" \
    --user-dir="${USER_DIR}" \
    --task=snli_ve \
    --selected-cols="${SELECTED_COLS}" \
    --bpe-dir="${BPE_DIR}" \
    --restore-file="${RESTORE_FILE}" \
    --reset-optimizer --reset-dataloader --reset-meters \
    --save-dir="${SAVE_DIR}" \
    --arch="${ARCH}" \
    --criterion=adjust_label_smoothed_cross_entropy \
    --layerwise-loss \
    --label-smoothing="${LABEL_SMOOTHING}" \
    --batch-size="${BATCH_SIZE}" \
    --update-freq="${UPDATE_FREQ}" \
    --decompose-modalities \
    "${OFA_RELEASED_MODEL_FLAGS[@]}" \
    --resnet-drop-path-rate="${RESNET_DROP_PATH_RATE}" \
    --encoder-drop-path-rate="${ENCODER_DROP_PATH_RATE}" \
    --decoder-drop-path-rate="${DECODER_DROP_PATH_RATE}" \
    --dropout="${DROPOUT}" \
    --attention-dropout="${ATTENTION_DROPOUT}" \
    --weight-decay=0.01 --optimizer=adam --adam-betas="(0.9,0.999)" --adam-eps=1e-08 --clip-norm=1.0 \
    --lr-scheduler=polynomial_decay --lr="${LR}" \
    --max-epoch="${MAX_EPOCH}" --warmup-ratio="${WARMUP_RATIO}" \
    --log-format=simple --log-interval=10 \
    --fixed-validation-seed=7 \
    --keep-best-checkpoints=1 \
    --save-interval=1 --validate-interval=1 \
    --save-interval-updates=500 --validate-interval-updates=500 \
    --best-checkpoint-metric=snli_score --maximize-best-checkpoint-metric \
    --ignore-unused-valid-subsets \
    --max-src-length="${MAX_SRC_LENGTH}" \
    --max-tgt-length="${MAX_TGT_LENGTH}" \
    --find-unused-parameters \
    --num-bins="${NUM_BINS}" \
    --patch-image-size="${PATCH_IMAGE_SIZE}" \
    --prompt-type="${PROMPT_TYPE}" \
    --add-caption \
    ${FP16} \
    --num-workers=0 2>&1 | tee "${LOG_FILE}"
