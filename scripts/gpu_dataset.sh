#!/bin/bash
# On a lent GPU machine (the `device` tool's `run`): train one dataset's per-passage bank and
# corpus-wide LoRAs there, answer every method, and pack the answer folders (never the bank) into
# $OUT/answers.tgz, for `dmoe eval --merge` here. How its inputs travel, under the 64 MiB a call may
# carry, is in results/smollm2-cpu/README.md (section "SQuAD").
#
#   bash scripts/gpu_dataset.sh DATASET[,DATASET...] LIMIT DEADLINE_S
#
# With several datasets (strategyqa,cwq: one Wikipedia pool), the bank and the LoRAs are trained
# once, on the first one's corpus, and every dataset is answered with them.
# Expects what scripts/gpu_prepare.sh laid out: the model's GGUF chunks in $STASH/part1..N (the
# earlier calls put them there), its alias and sha256 in .gpu/model, the benchmark files under
# .gpu/data/, wheels of packages the machine lacks in .gpu/whl/. Every eval is resumable:
# rerunning finishes what a deadline cut.
# $OFFSET: the first question (default 0), for a dataset answered in slices over several leases.
# $CHUNK: experts trained side by side (default 32, as on the CPU; the same experts at any size).
# $HEAD_VOCAB: the experts' and corpus LoRAs' candidate output head (--head-vocab; default unset,
# the full head); the Gemma tables use 64 (results/gemma3-270m-cpu/README.md).
# $ARM_SHARDS, $FLARE_SHARDS: worker processes for the 7 batched arms (default 2) and FLARE (4).
# $JOBS: which groups run (default bank,loras,flare; bank = the bank then the 7 batched arms,
# loras = the two corpus LoRAs, each then its answers). The LoRAs (~1 MB) come back
# in $OUT/loras.tgz, so their answers can be finished elsewhere if a deadline cuts them.
set -u
DS=$1; BUILD=${1%%,*}; LIMIT=$2; DEADLINE=$3; DEV=${DEV:-cuda}; PY=${PY:-python3}; OFFSET=${OFFSET:-0}
T0=$(date +%s)
left() { local l=$(( DEADLINE - ($(date +%s) - T0) )); echo $(( l > 1 ? l : 1 )); }
stamp() { echo "$1 rc=$2 at +$(( $(date +%s) - T0 ))s"; }
OUT=${OUT:-/tmp/out}; STASH=${STASH:-/tmp/stash}; W=${WORK:-/tmp/w}; R=$PWD
L=$W/logs  # every job's log, packed into $OUT/logs.tgz (a call returns few files)
mkdir -p "$OUT" "$L" "$W/site"
if [ -d .gpu/whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" .gpu/whl/*.whl
fi
export PYTHONPATH=$W/site:$R/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 \
    MKL_NUM_THREADS=2 DMOE_DATA_DIR=${DATA:-$R/.gpu/data} DMOE_CACHE_DIR=$W/cache
MODEL=$(head -1 .gpu/model)  # the packaged alias gpu_prepare.sh cut; its chunks are in $STASH
# where dmoe looks for that alias's GGUF: a chunked package's assembled copy in the cache, else
# the package's folder (found by importlib, never imported), so `--model $MODEL` resolves as here
GGUF=$($PY -c "from dmoe.base_model import PACKAGED_MODELS, assembled_gguf
pm = PACKAGED_MODELS['$MODEL']
print(assembled_gguf(pm) if pm.parts else f'$W/site/{pm.package}/{pm.file}')")
mkdir -p "$(dirname "$GGUF")"
[[ $GGUF == $W/site/* ]] && touch "$(dirname "$GGUF")/__init__.py"  # the packaged layout
[ -s "$GGUF" ] || cat $(ls "$STASH"/part* | sort -V) > "$GGUF"
(cd "$(dirname "$GGUF")" && tail -n +2 "$R/.gpu/model" | sha256sum -c) || { echo "model chunks missing"; exit 3; }
D="$PY -m dmoe.cli"
A="--model $MODEL --datasets $DS --offset $OFFSET --limit $LIMIT --device $DEV --weights fp32 --no-progress"
# one load first, so the processes below read the dequantised cache instead of racing to build it
$PY -c "from dmoe.base_model import load_base_model; load_base_model('$MODEL', '$DEV', training=True)"
stamp "model cached" 0
JOBS=,${JOBS:-bank,loras,flare},
wants() { [[ $JOBS == *,$1,* ]]; }
pids=()
wants bank && ( t=$(date +%s)
  timeout "$(left)" $PY scripts/build_eval_bank.py --model "$MODEL" --dataset "$BUILD" \
      --offset "$OFFSET" --limit "$LIMIT" ${HEAD_VOCAB:+--head-vocab "$HEAD_VOCAB"} \
      --bank "$W/bank" --device "$DEV" --chunk-size "${CHUNK:-32}" \
      > "$L/bank.log" 2>&1
  rc=$?; stamp "bank $(( $(date +%s) - t ))s" $rc  # rc first: $(date) would reset $?
  arms=()
  for ((s = 0; s < ${ARM_SHARDS:-2}; s++)); do
    timeout "$(left)" $D eval --methods base,rag,prag,prag_combine,dmoe,dmoe_random,dmoe_shuffled $A \
        --batch-size 16 --bank "$W/bank" --shard $s/${ARM_SHARDS:-2} --out "$W/A-$s" \
        > "$L/arms-$s.log" 2>&1 &
    arms+=($!)
  done
  wait "${arms[@]}"; stamp arms $? ) & pids+=($!)
# sft_lora and poly_prag train side by side, each with its own pass of the frozen trunk (both
# run launch-bound steps, so the two overlap on a GPU), then answer into SFT_LORA/ and POLY_PRAG/
lora() {  # METHOD FLAG PATH READY (FLAG PATH: the same for the trainer and dmoe eval)
  local t=$(date +%s)
  timeout "$(left)" $PY scripts/build_eval_bank.py --model "$MODEL" --dataset "$BUILD" \
      --offset "$OFFSET" --limit "$LIMIT" ${HEAD_VOCAB:+--head-vocab "$HEAD_VOCAB"} \
      --no-bank --device "$DEV" $2 "$3" > "$L/lora-$1.log" 2>&1
  rc=$?; stamp "$1 trained $(( $(date +%s) - t ))s" $rc  # rc first: $(date) would reset $?
  [ -s "$4" ] || return  # a deadline cut the training: nothing to answer with
  timeout "$(left)" $D eval --methods "$1" $A --batch-size 16 $2 "$3" --out "$W/${1^^}" \
      > "$L/answers-$1.log" 2>&1
  stamp "$1 answers" $?
}
wants loras && { lora sft_lora --sft-lora "$W/sft.safetensors" "$W/sft.safetensors" &
  pids+=($!)
  lora poly_prag --poly "$W/poly" "$W/poly/manifest.json" & pids+=($!); }
wants flare && for ((s = 0; s < ${FLARE_SHARDS:-4}; s++)); do
  ( timeout "$(left)" $D eval --methods flare $A --shard $s/${FLARE_SHARDS:-4} --out "$W/FL-$s" \
        > "$L/fl-$s.log" 2>&1
    stamp flare-$s $? ) & pids+=($!)
done
wait "${pids[@]}"  # the jobs by pid: a bare `wait` would also wait on any process substitution
stamp "all" 0
(cd "$W" && tar -czf "$OUT/answers.tgz" --exclude=bank --exclude='*.safetensors' --exclude=poly \
    $(ls -d A-* SFT_LORA POLY_PRAG FL-* 2>/dev/null))  # whatever the deadline let finish: rerunning resumes the rest
tar -C "$W" -czf "$OUT/logs.tgz" logs
loras=$(cd "$W" && ls -d sft.safetensors poly 2>/dev/null)
[ -n "$loras" ] && tar -C "$W" -czf "$OUT/loras.tgz" $loras
ls -la "$OUT"
