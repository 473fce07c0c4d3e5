#!/usr/bin/env bash
# The CPU benchmarks of this folder, run once on a lent GPU machine (bare image with torch; nothing can be
# downloaded there). Carried in: .whl (trl, datasets and what they need, as wheels), .gpucache (alignkit's
# converted tokenizer cache), benchmarks/.work/*.jsonl (the data files the CPU runs used). The SmolLM2 cases
# use random weights of SmolLM2-135M's shape (the real weights are too large to carry); speed does not
# depend on the weights' values. Results land in $OUT (or benchmarks/results/gpu when OUT is unset), each
# stage's full output beside its JSON (.log), so that runs a time limit cuts still leave their lines.
#
# Order and time limits (about 9.5 minutes in all, for a 10-minute command): flex_check (dense vs
# --attention_kernel flex: same log-probs and gradients, forward+backward ms), then DPO and the reward model
# on the SmolLM2 shape, alignkit dense vs alignkit flex vs TRL (the flex runs' first steps compile the kernel:
# they fall in the warm-up the steady rates leave out), then SFT on the SmolLM2 shape.
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}; mkdir -p "$OUT"
STEPS=${1:-20}
if [ -d .whl ]; then
  # into the image's own environment: dill (datasets' fingerprints) pickles modules that live outside
  # sys.prefix by value, which fails, so a --target folder on PYTHONPATH does not work for TRL
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile . || exit 1
fi
export ALIGNKIT_CACHE=$PWD/.gpucache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, trl, datasets, alignkit; print(torch.__version__, torch.cuda.get_device_name(), transformers.__version__, trl.__version__)" || exit 1
python3 -c "from datasets import Dataset; Dataset.from_list([{'a': 1}]).map(lambda r: {'b': r['a']})" || exit 1
common="--device cuda --precision bf16 --random-weights --repeats 2 --retries 0 --max-wait 0 --steps $STEPS --no-docs"
timeout 80 python3 benchmarks/flex_check.py 2>&1 | tee "$OUT/gpu_flex_check.log" | tail -4
timeout 200 python3 benchmarks/bench_dpo.py $common --which smollm --tools alignkit,trl,alignkit-flex \
  --output "$OUT/gpu_dpo.json" 2>&1 | tee "$OUT/gpu_dpo.log" | tail -14
timeout 180 python3 benchmarks/bench_rm.py $common --which smollm --variants flex \
  --output "$OUT/gpu_rm.json" 2>&1 | tee "$OUT/gpu_rm.log" | tail -12
timeout 90 python3 benchmarks/bench_sft.py $common --which smollm --output "$OUT/gpu_sft.json" 2>&1 | tee "$OUT/gpu_sft.log" | tail -12
for f in benchmarks/.work/runs/*.log; do grep -q Traceback "$f" && { echo "== $f"; tail -5 "$f"; }; done
nvidia-smi --query-gpu=name,memory.total --format=csv
