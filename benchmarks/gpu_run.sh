#!/usr/bin/env bash
# The lent-GPU checks, in one call of a few minutes (see docs/benchmarks.md, "GPU" and
# docs/distributed.md). Each part has its own time limit and a failure does not stop the next.
#
#   1. a recipe on one GPU in bf16: recipes/ewc/qwen2.5-0.5b.yaml through `accelerate launch` with
#      recipes/accelerate/single_gpu.yaml, on a random model of Qwen2.5-0.5B's shape saved to a
#      local folder (the machine reaches no Hub); wall time, throughput, peak GPU memory;
#   2. the step-overhead benchmark in bf16 on a wider GPT-2 (12 x 768);
#   3. FSDP2 on one GPU against plain one-GPU training, through tests/distributed_driver.py: the
#      same weights and strategy state after each task (world size 1: shows the strategies run on
#      FSDP2's sharded DTensor parameters, not that sharding over several GPUs is right);
#   4. the real-model recipe recipes/real/qwen2.5-0.5b-instruct-lora.yaml (LoRA, TRL SFT, replay + EWC)
#      on its offline twin (benchmarks/real_twin.py): a random model of Qwen2.5-0.5B's shape and local
#      JSONL files in the layouts of the recipe's Hub datasets; wall time, peak GPU memory, results.
#   5. DeepSpeed ZeRO-2 and ZeRO-3 on one GPU against plain one-GPU training (tests/distributed_driver.py
#      --deepspeed 2|3 under torchrun): the same weights and strategy state after each task, for every
#      strategy the trainer allows on that stage; skipped, saying so, when DeepSpeed is not installed
#      (its CPU runs are tests/test_deepspeed.py and tests/test_deepspeed_zero3.py).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh            # on the GPU machine
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_run.sh    # tiny sizes, parts 1-2 only on a CPU: a smoke run
# Wheels of packages the GPU image lacks (datasets, ...) are installed from .whl/ when it exists.
set -u
OUT=${OUT:-/tmp/gpu_out}
WORK=${WORK:-/tmp/gpu_work}
QUICK=${QUICK:-0}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-python3}
if [ "$QUICK" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
LAUNCH="$PY -m accelerate.commands.launch"
{
    date -u
    $PY -c "import torch, transformers, datasets, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| transformers', transformers.__version__, '| datasets', datasets.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} 2>&1 | tee "$OUT/env.log"

# --- 1. recipe, one GPU, bf16 ---------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
    MODEL_ARGS="--layers 2 --hidden 64 --heads 2 --kv-heads 1 --intermediate 128 --vocab 0"
    RECIPE_ARGS="--training.num_train_epochs 0.05 --strategies.0.fisher_samples 8"
    LAUNCH_ARGS="--cpu --mixed_precision no"
else
    MODEL_ARGS=""
    RECIPE_ARGS=""
    LAUNCH_ARGS=""
fi
{
    $PY benchmarks/gpu_check.py model "$WORK/qwen-shape" $MODEL_ARGS
    (nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/recipe_mem.csv" 2>/dev/null &
     echo $! > "$WORK/smi.pid")
    start=$(date +%s)
    # The recipe as written, except: the local model folder, and a learning rate for a random
    # (not pretrained) model so that it learns something in one epoch.
    timeout ${RECIPE_TIMEOUT:-200} $LAUNCH --config_file recipes/accelerate/single_gpu.yaml $LAUNCH_ARGS \
        -m clm_hf.cli train recipes/ewc/qwen2.5-0.5b.yaml --model.name_or_path "$WORK/qwen-shape" \
        --training.output_dir "$WORK/runs/ewc-qwen" --training.learning_rate 1e-4 --training.logging_steps 25 \
        --training.disable_tqdm true $RECIPE_ARGS
    echo "recipe exit $? wall_s $(( $(date +%s) - start ))"
    kill "$(cat "$WORK/smi.pid")" 2>/dev/null
    $PY benchmarks/gpu_check.py gpu-memory "$WORK/recipe_mem.csv"
    cp "$WORK/runs/ewc-qwen/results.json" "$OUT/recipe_results.json"
} > "$OUT/recipe.log" 2>&1
tail -n 12 "$OUT/recipe.log"

# --- 2. step overhead, bf16, GPT-2 12 x 768 -----------------------------------------------------------
if [ "$QUICK" = 1 ]; then
    STEP_ARGS="--quick --strategies ewc,gem"
else
    STEP_ARGS="--models wide --bf16 --seq-len 60 --blocks 8 --block-steps 4 --strategies ${STEP_STRATEGIES:-replay,ewc,lwf,lwf_cached,packnet,pnn,olora,agem,gem} --gem-scaling wide=1,2,4,8 --gem-curves total:16"
fi
timeout ${STEP_TIMEOUT:-210} $PY benchmarks/step_overhead.py $STEP_ARGS --output "$OUT/step_overhead_gpu.json" \
    --plot "$OUT/gem_scaling_gpu.png" > "$OUT/step.log" 2>&1
echo "step overhead exit $?"
tail -n 14 "$OUT/step.log"

# --- 3. FSDP2 on one GPU == plain one-GPU training --------------------------------------------------
if [ "$QUICK" != 1 ]; then
    RUNS=${FSDP_RUNS:-plain,replay,ewc,lwf,packnet,pnn,olora,replay+ewc}
    {
        timeout ${FSDP_TIMEOUT:-90} $PY -m tests.distributed_driver "$WORK/d/plain" --batch 8 --runs "$RUNS" --gpu
        echo "plain exit $?"
        timeout ${FSDP_TIMEOUT:-90} $LAUNCH --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 \
            --mixed_precision no -m tests.distributed_driver "$WORK/d/fsdp" --batch 8 --runs "$RUNS" --gpu
        echo "fsdp exit $?"
        $PY benchmarks/gpu_check.py compare "$WORK/d/plain" "$WORK/d/fsdp" --runs "$RUNS" --atol 1e-5 | tee "$OUT/fsdp_compare.json"
    } > "$OUT/fsdp.log" 2>&1
    tail -n 40 "$OUT/fsdp.log"
fi
# --- 4. the real-model recipe on its twin (docs/real_models.md) -------------------------------------
# The recipe as written (trainer, LoRA, strategies, reference set, training arguments), except: the
# model and the datasets are the offline twin's (the machine reaches no Hub), and the row counts.
if [ "$QUICK" = 1 ]; then
    TWIN_ARGS="--num-train 8 --num-eval 4"
    REAL_ARGS="--training.max_steps 1 --training.use_cpu true --training.generation_max_new_tokens 4 --strategies.1.fisher_samples 8"
else
    TWIN_ARGS="--qwen-shape --num-train ${REAL_ROWS:-512} --num-eval 64"
    REAL_ARGS=""
fi
# `trainer: sft` needs TRL: from the image, or a trl wheel in .whl/ (installed at the top).
if ! $PY -c "import trl" 2>/dev/null; then
    echo "real recipe skipped: trl is not importable (put a trl wheel in .whl/)" | tee "$OUT/real.log"
else
{
    OVERRIDES=$($PY benchmarks/real_twin.py recipes/real/qwen2.5-0.5b-instruct-lora.yaml "$WORK/real" $TWIN_ARGS)
    eval "set -- $OVERRIDES"
    (nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/real_mem.csv" 2>/dev/null &
     echo $! > "$WORK/smi.pid")
    start=$(date +%s)
    timeout ${REAL_TIMEOUT:-240} $PY -m clm_hf.cli train recipes/real/qwen2.5-0.5b-instruct-lora.yaml "$@" \
        --training.output_dir "$WORK/runs/real" --training.disable_tqdm true $REAL_ARGS
    echo "real recipe exit $? wall_s $(( $(date +%s) - start ))"
    kill "$(cat "$WORK/smi.pid")" 2>/dev/null
    $PY benchmarks/gpu_check.py gpu-memory "$WORK/real_mem.csv"
    cp "$WORK/runs/real/results.json" "$OUT/real_recipe_results.json"
} > "$OUT/real.log" 2>&1
tail -n 12 "$OUT/real.log"
fi
# --- 5. DeepSpeed ZeRO-2 / ZeRO-3 on one GPU == plain one-GPU training --------------------------------
if [ "$QUICK" != 1 ]; then
    {
        if $PY -c "import deepspeed" 2>/dev/null; then
            for STAGE in 2 3; do
                if [ "$STAGE" = 2 ]; then DS_RUNS=${DS2_RUNS:-plain,replay,ewc,lwf,pnn,olora}; else DS_RUNS=${DS3_RUNS:-replay,lwf-cached,ewc,ewc-separate}; fi
                timeout ${DS_TIMEOUT:-120} $PY -m tests.distributed_driver "$WORK/ds$STAGE/plain" --batch 8 --runs "$DS_RUNS" --gpu
                echo "plain exit $?"
                timeout ${DS_TIMEOUT:-120} $PY -m torch.distributed.run --nproc_per_node 1 -m tests.distributed_driver \
                    "$WORK/ds$STAGE/ds" --batch 8 --runs "$DS_RUNS" --gpu --deepspeed "$STAGE"
                echo "zero$STAGE exit $?"
                $PY benchmarks/gpu_check.py compare "$WORK/ds$STAGE/plain" "$WORK/ds$STAGE/ds" --runs "$DS_RUNS" --atol 1e-5 \
                    | tee "$OUT/zero${STAGE}_compare.json"
            done
        else
            echo "DeepSpeed is not installed on this machine: part 5 skipped (pip install 'clm-hf[deepspeed]', or a wheel in .whl/)"
        fi
    } > "$OUT/deepspeed.log" 2>&1
    tail -n 30 "$OUT/deepspeed.log"
fi
date -u
