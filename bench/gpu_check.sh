#!/usr/bin/env bash
# GPU check: on one CUDA GPU, in under 8 minutes (stage limits sum to 7.5), measure the GPU paths
# instead of assuming them. NOT yet run on a GPU: written and dry-run on CPU only (--dry-run).
#
#   bash bench/gpu_check.sh            # SmolLM2-135M + LoRA r16, bf16, on cuda:0
#   bash bench/gpu_check.sh --dry-run  # the same generation/PPO python on CPU with tiny-random and
#                                      # small sizes; the SFT/reward/DPO benches only parse --help
#
# Runs, each under its own time limit, printing its figures:
#   1. SFT        bench/bench_sft.py (fp32 vs bf16 tokens/s)
#   2. reward     bench/bench_reward.py, prefloop's trainer on the bundled pairs
#   3. DPO        bench/bench_dpo.py, prefloop's trainer
#   4. PPO step   bench/bench_ppo.py (today's step vs the pre-issue-13 tree from git, losses on the
#                 same rollouts; needs the git history)
#   5. generation bench/bench_generation.py (decode batch 16 x 128 tokens, engine vs HF generate)
# A stage that fails or times out is reported and the next one still runs; the exit status is
# the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
export PREFLOOP_HOME=${PREFLOOP_HOME:-$HOME/.cache/prefloop}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if (( DRY )); then
  MODEL=tiny-random; DEVICE=cpu; NEW=8; BATCH=4; THREADS=(--threads 1)
else
  MODEL=smollm2-135m-instruct; DEVICE=cuda; NEW=128; BATCH=16; THREADS=()
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch (use --dry-run on CPU)" >&2
    exit 2
  fi
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}')"
fi
"$PY" -c "from serving.cli import app; app()" models pull "$MODEL" >/dev/null

failed=0
stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  # A dry run is on a (possibly shared) CPU, not the GPU's 8-minute budget: bench_sft alone
  # imports transformers/TRL for over 60 s before parsing --help on a loaded box.
  (( DRY )) && limit=$((limit * 4))
  echo; echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start))s"
  (( rc == 0 )) || failed=$((failed + 1))
}

if (( DRY )); then
  stage sft 60 "$PY" bench/bench_sft.py --help
  stage reward 60 "$PY" bench/bench_reward.py --help
  stage dpo 60 "$PY" bench/bench_dpo.py --help
else
  stage sft 80 "$PY" bench/bench_sft.py --steps 6 --warmup 2 --batch-size 8
  stage reward 90 "$PY" bench/bench_reward.py --steps 6 --methods prefloop --datasets bundled
  stage dpo 80 "$PY" bench/bench_dpo.py --steps 5 --warmup 2 --rounds 1 --methods prefloop
fi
stage ppo-step 120 "$PY" bench/bench_ppo.py --model "$MODEL" --steps 1 --warmup 1 "${THREADS[@]}"
stage generation 80 "$PY" bench/bench_generation.py --model "$MODEL" --device "$DEVICE" --batch "$BATCH" \
  --new-tokens "$NEW" --repeats 2 "${THREADS[@]}"
echo; echo "gpu_check: $failed stage(s) failed"
exit "$failed"
