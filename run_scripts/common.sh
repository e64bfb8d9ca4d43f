# Shared helpers of the run scripts (sourced, not run).
#   die MESSAGE                 print "error: MESSAGE" to stderr and exit 1
#   require_file WHAT PATH      stop unless PATH is a file, naming WHAT and PATH
#   require_dir WHAT PATH       the same for a folder
#   require_bpe_dir PATH        the folder and its dict.txt, encoder.json, vocab.bpe
#   find_user_dir               sets USER_DIR to the mue_fairseq package folder (installed
#                               package first, else this checkout; then PYTHONPATH includes
#                               the checkout) unless USER_DIR is already set
#   total_batch_to_update_freq TOTAL PER_GPU GPUS   echo the --update-freq giving TOTAL
#   OFA_RELEASED_MODEL_FLAGS    the model flags every released OFA checkpoint was trained with
#                               (OFA's arch functions leave the NormFormer ones off)

OFA_RELEASED_MODEL_FLAGS=(
  --encoder-normalize-before --decoder-normalize-before
  --share-decoder-input-output-embed --share-all-embeddings
  --layernorm-embedding --patch-layernorm-embedding --code-layernorm-embedding
  --add-type-embedding --scale-attn --scale-fc --scale-heads --disable-entangle
)

die() {
  echo "error: $*" >&2
  exit 1
}

require_file() {
  [ -f "$2" ] || die "$1 not found: $2"
}

require_dir() {
  [ -d "$2" ] || die "$1 not found: $2"
}

require_bpe_dir() {
  require_dir "BPE folder (BPE_DIR)" "$1"
  local name
  for name in dict.txt encoder.json vocab.bpe; do
    require_file "BPE file ${name} (BPE_DIR)" "$1/${name}"
  done
}

find_user_dir() {
  if [ -z "${USER_DIR:-}" ]; then
    USER_DIR=$(python -c "import mue_fairseq, os; print(os.path.dirname(mue_fairseq.__file__))" 2>/dev/null || true)
  fi
  if [ -z "${USER_DIR}" ]; then
    local checkout
    checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [ -f "${checkout}/mue_fairseq/__init__.py" ]; then
      USER_DIR="${checkout}/mue_fairseq"
      export PYTHONPATH="${checkout}${PYTHONPATH:+:${PYTHONPATH}}"
    fi
  fi
  [ -n "${USER_DIR}" ] || die "mue_fairseq is not installed (pip install . in the mue_fairseq checkout) and this script is not inside a checkout"
  require_file "mue_fairseq package (USER_DIR)" "${USER_DIR}/__init__.py"
}

total_batch_to_update_freq() {
  local total=$1 per_gpu=$2 gpus=$3
  local per_step=$(( per_gpu * gpus ))
  [ "${per_step}" -gt 0 ] && [ $(( total % per_step )) -eq 0 ] \
    || die "total batch ${total} is not a multiple of BATCH_SIZE ${per_gpu} x GPUS ${gpus}"
  echo $(( total / per_step ))
}
