#!/bin/bash
# Here, before a lent GPU's calls: lay out what scripts/gpu_dataset.sh needs there, within the
# 64 MiB a call may carry. Usage (repo root):
#   [MODEL=smollm2|gemma3-270m] bash scripts/gpu_prepare.sh DATASET [DATASET...]
#   .gpu1/part .. .gpuN/part  the model's GGUF cut in chunks of 64,000,000 bytes (SmolLM2: 2,
#                             Gemma-3-270M: 4); call K carries .gpuK and stashes its chunk
#   .gpu/model                the model's name (a packaged alias) and the whole GGUF's sha256
#   .gpu/data/<dataset>/      the benchmark files the datasets read (wikipedia/ too for strategyqa, cwq)
#   .gpu/whl/                 wheels of what the machine's image lacks (gguf, tantivy), for Python 3.12
# All are ignored through .git/info/exclude. It then prints the calls to make, in order.
set -eu
[ $# -ge 1 ] || { echo "usage: [MODEL=NAME] $0 DATASET [DATASET...]" >&2; exit 2; }
PY=${PY:-.venv/bin/python}
DATA=${DMOE_DATA_DIR:-../shared/data}
MODEL=${MODEL:-smollm2}
# the GGUF dmoe itself resolves for this alias (Gemma's: assembled from its chunk packages)
gguf=$($PY -c "from dmoe.base_model import resolve_model; print(resolve_model('$MODEL').path)")
mkdir -p .git/info
grep -qxF '/.gpu*/' .git/info/exclude 2>/dev/null || echo '/.gpu*/' >> .git/info/exclude
rm -rf .gpu .gpu[0-9]*
mkdir -p .gpu/data .gpu/whl .gpu/split
split -b 64000000 -d -a 2 "$gguf" .gpu/split/
n=0
for chunk in .gpu/split/*; do
  n=$((n + 1)); mkdir -p ".gpu$n" && mv "$chunk" ".gpu$n/part"
done
rmdir .gpu/split
printf '%s\n%s  %s\n' "$MODEL" "$(sha256sum < "$gguf" | cut -d' ' -f1)" "$(basename "$gguf")" > .gpu/model
for ds in "$@"; do
  case $ds in
    strategyqa|cwq) dirs="$ds wikipedia" ;;
    *) dirs=$ds ;;
  esac
  for d in $dirs; do
    [ -d "$DATA/$d" ] || { echo "no benchmark folder $DATA/$d" >&2; exit 2; }
    mkdir -p ".gpu/data/$d" && cp -r "$DATA/$d/." ".gpu/data/$d/"
  done
done
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "gguf==$(ver gguf)" "tantivy==$(ver tantivy)"
du -sh .gpu .gpu[0-9]*
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "tracked files: $((tracked / 1048576)) MiB travel with each call (64 MiB in all); if a .gpu*"
echo "folder does not fit beside them: git rm -r -q --cached results && echo /results/ >> .git/info/exclude"
echo "(undo right after the calls: git reset -q -- results, and drop that line from .git/info/exclude)"
echo "the calls, one straight after another (the machine goes back after 30 s idle):"
for ((k = 1; k <= n; k++)); do
  echo "  call $k (carry .gpu$k): mkdir -p /tmp/stash && cp .gpu$k/part /tmp/stash/part$k"
done
echo "  call $((n + 1)) (carry .gpu): bash scripts/gpu_dataset.sh $(IFS=,; echo "$*") 300 540"
