#!/usr/bin/env bash
# MuE fine-tuning of OFA-base on COCO captions, stage 2 (self-critical sequence training with
# a CIDEr-D reward), from the stage-1 checkpoint: OFA's train_caption_stage2_base.sh with
# stock fairseq-train and --user-dir mue_fairseq, the MuE paper's hyperparameters (Adam,
# lr 3e-5, weight decay 0.01, total batch 64, 5 epochs) and modality decomposition. The SCST
# criterion has no layer-wise variant: the layer-wise task loss is a stage-1 objective.
#
#   bash train_caption_stage2_base.sh          # DATA_DIR=... GPUS=... to override
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${SCRIPT_DIR}/../common.sh"

# ---- inputs and outputs
DATA_DIR=${DATA_DIR:-../../dataset/caption_data}
TRAIN_FILE=${TRAIN_FILE:-${DATA_DIR}/caption_stage2_train.tsv}
VALID_FILE=${VALID_FILE:-${DATA_DIR}/caption_val.tsv}
EVAL_CIDER_CACHED=${EVAL_CIDER_CACHED:-${DATA_DIR}/cider_cached_tokens/coco-valid-words.p}
SCST_CIDER_CACHED=${SCST_CIDER_CACHED:-${DATA_DIR}/cider_cached_tokens/coco-train-words.p}
BPE_DIR=${BPE_DIR:-../../utils/BPE}
RESTORE_FILE=${RESTORE_FILE:-./stage1_checkpoints/caption_base_mue/checkpoint_best.pt}
SAVE_DIR=${SAVE_DIR:-./stage2_checkpoints/caption_base_mue}
LOG_DIR=${LOG_DIR:-./stage2_logs}
GPUS=${GPUS:-8}
MASTER_PORT=${MASTER_PORT:-1062}
FP16=${FP16---memory-efficient-fp16 --fp16-scale-window=512}   # FP16= (empty) for float32

# ---- hyperparameters (paper §4 / Appendix; the rest OFA's train_caption_stage2_base.sh)
ARCH=${ARCH:-ofa_base}
LR=${LR:-3e-5}                        # OFA's stage 2: 1e-5
MAX_EPOCH=${MAX_EPOCH:-5}             # OFA's stage 2: 3
WARMUP_RATIO=${WARMUP_RATIO:-0.06}
TOTAL_BATCH=${TOTAL_BATCH:-64}        # OFA's stage 2: 2 x 4 x 8 = 64
BATCH_SIZE=${BATCH_SIZE:-2}           # per GPU (each image makes beam-size candidates)
RESNET_DROP_PATH_RATE=${RESNET_DROP_PATH_RATE:-0.0}
ENCODER_DROP_PATH_RATE=${ENCODER_DROP_PATH_RATE:-0.0}
DECODER_DROP_PATH_RATE=${DECODER_DROP_PATH_RATE:-0.0}
DROPOUT=${DROPOUT:-0.0}
ATTENTION_DROPOUT=${ATTENTION_DROPOUT:-0.0}
MAX_SRC_LENGTH=${MAX_SRC_LENGTH:-80}
MAX_TGT_LENGTH=${MAX_TGT_LENGTH:-20}
NUM_BINS=${NUM_BINS:-1000}
PATCH_IMAGE_SIZE=${PATCH_IMAGE_SIZE:-480}
SELECTED_COLS=${SELECTED_COLS:-1,4,2}
EVAL_ARGS=${EVAL_ARGS:-'{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}'}
SCST_ARGS=${SCST_ARGS:-'{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}'}

# ---- checks: every input must exist before anything starts
require_file "training data (TRAIN_FILE)" "${TRAIN_FILE}"
require_file "validation data (VALID_FILE)" "${VALID_FILE}"
require_file "CIDEr document frequencies for validation (EVAL_CIDER_CACHED)" "${EVAL_CIDER_CACHED}"
require_file "CIDEr document frequencies for the SCST reward (SCST_CIDER_CACHED)" "${SCST_CIDER_CACHED}"
require_bpe_dir "${BPE_DIR}"
require_file "stage-1 checkpoint (RESTORE_FILE)" "${RESTORE_FILE}"
command -v fairseq-train >/dev/null || die "fairseq-train not found: pip install ve-fairseq==0.12.3"
command -v torchrun >/dev/null || die "torchrun not found (it comes with torch)"
find_user_dir
UPDATE_FREQ=$(total_batch_to_update_freq "${TOTAL_BATCH}" "${BATCH_SIZE}" "${GPUS}")

mkdir -p "${SAVE_DIR}" "${LOG_DIR}"
LOG_FILE=${LOG_FILE:-${LOG_DIR}/caption_stage2_base_mue_${LR}_${MAX_EPOCH}.log}
echo "training; log: ${LOG_FILE}, checkpoints: ${SAVE_DIR}"

# shellcheck disable=SC2086  # FP16 holds several options
torchrun --nproc_per_node="${GPUS}" --master_port="${MASTER_PORT}" --no-python fairseq-train \
    "${TRAIN_FILE},${VALID_FILE}" \
    --user-dir="${USER_DIR}" \
    --task=caption \
    --selected-cols="${SELECTED_COLS}" \
    --bpe-dir="${BPE_DIR}" \
    --restore-file="${RESTORE_FILE}" \
    --reset-optimizer --reset-dataloader --reset-meters \
    --save-dir="${SAVE_DIR}" \
    --arch="${ARCH}" \
    --criterion=scst_reward_criterion \
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
    --no-epoch-checkpoints --keep-best-checkpoints=1 \
    --save-interval=1 --validate-interval=1 \
    --save-interval-updates=500 --validate-interval-updates=500 \
    --eval-cider \
    --eval-cider-cached-tokens="${EVAL_CIDER_CACHED}" \
    --eval-args="${EVAL_ARGS}" \
    --best-checkpoint-metric=cider --maximize-best-checkpoint-metric \
    --ignore-unused-valid-subsets \
    --max-src-length="${MAX_SRC_LENGTH}" \
    --max-tgt-length="${MAX_TGT_LENGTH}" \
    --find-unused-parameters \
    --freeze-encoder-embedding \
    --freeze-decoder-embedding \
    --num-bins="${NUM_BINS}" \
    --patch-image-size="${PATCH_IMAGE_SIZE}" \
    --scst \
    --scst-cider-cached-tokens="${SCST_CIDER_CACHED}" \
    --scst-args="${SCST_ARGS}" \
    ${FP16} \
    --num-workers=0 2>&1 | tee "${LOG_FILE}"
