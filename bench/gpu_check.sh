#!/usr/bin/env bash
# The CUDA checks of issue 18 in one run, for a session that is lent a GPU machine (the `device`
# tool's `run`, which starts in the repo root and brings back what lands in $OUT). Nothing here is a
# test: CI has no GPU. Each step has its own time limit and log; a failed step does not stop the rest.
#
#   run: bash bench/gpu_check.sh            (timeout_s 560; about 6 minutes on one H200)
#
# 1. env.txt: torch, transformers, the device, bf16 support.
# 2. demo.txt: `ligo demo` on CUDA: pretrains a tiny GPT-2 with its own tokenizer, grows it with a
#    fitted LiGO operator (bf16 autocast), prints the report.
# 3. grow.json: that pretrained model grown to the gpt2-medium shape (355M) with a 50-step LiGO fit
#    on CUDA, written in bf16, with held-out scoring: the CUDA bf16 path end to end through the CLI.
#    (A real pretrained checkpoint cannot travel: the working tree is capped at 64 MiB and SmolLM2's
#    smallest file is larger; the machine reaches no model hub.)
# 4. scale_fit.txt: one fitting step, layer by layer and whole-model, and a plain AdamW step, for
#    GPT-2 124M -> gpt2-medium, gpt2-large and gpt2-xl shapes, with each step's peak CUDA memory.
set -uo pipefail
out=${OUT:-/tmp/ligo-gpu-check}
python=${PYTHON:-python3}  # the GPU machine's python3 holds torch and transformers
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run it, keep its output, say how it ended
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name" 2>"$out/$name.err"
    echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
}

step env.txt 60 "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__); print(torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
step demo.txt 120 "$python" -m ligo_core.cli demo --workdir "$work/demo"
step grow.json 150 "$python" -m ligo_core.cli grow "$work/demo/small" --target gpt2-medium --strategy ligo \
    --fit-steps 50 --device cuda --dtype bfloat16 --out "$work/grown" --json
step scale_fit.txt 240 "$python" -m bench.scale_fit --targets gpt2-medium gpt2-large gpt2-xl \
    --paths layerwise dense adamw --no-record
tail -n 3 "$out"/*.err >"$out/errors.txt" 2>/dev/null

rm -rf "$work"
