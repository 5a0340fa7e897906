# Issue 30: Megatron-LM's own pretrain_gpt.py with Magma, whole, on the one-GPU machine, in one
# device call (the `device` tool's `run`, kind nvidia-h100-x1), through the supported route
# (python -m magma_ext.megatron.training, docs/megatron.md "Megatron-LM's own loop"):
#
#   bash benchmarks/pretrain_gpt_device_run.sh
#
# Carry `.whl` (the megatron-core 0.19.2 wheel, see benchmarks/device_setup.sh; its wheel holds
# megatron/training) and `.megatron-lm` (git-ignored): pretrain_gpt.py, gpt_builders.py and
# model_provider.py of Megatron-LM d98e8a64dd, the commit docs/megatron.md names, e.g. from the
# library's snapshot of NVIDIA/Megatron-LM:
#
#   mkdir -p .megatron-lm && for f in pretrain_gpt.py gpt_builders.py model_provider.py; do
#     git --git-dir /work/.mirror/NVIDIA+Megatron-LM/repo show d98e8a64dd:$f > .megatron-lm/$f; done
#
# A 4-layer GPT (width 256, Megatron's mock data, NullTokenizer, bf16, the distributed optimizer,
# --transformer-impl local: no Transformer Engine or apex there) for 40 iterations, four runs:
#   magma          Magma (keep 0.5, tensor blocks), 40 iterations uninterrupted;
#   magma_saved    the same, stopped at iteration 20 with a checkpoint (--exit-interval 20);
#   magma_resumed  loading that checkpoint and going on to 40: its losses must repeat magma's;
#   adam           Megatron's own Adam (no --magma), the baseline.
# The first, second and last run side by side (the model leaves the GPU mostly idle), then the
# resumed one. benchmarks/pretrain_gpt_summary.py then prints the losses and the checks (Magma's
# loss halved, resumed = uninterrupted within 1e-3, no skipped or NaN iteration, Magma's scores
# in the checkpoint) into $OUT/logs/pretrain_gpt_<gpu>_<date>.md. About 3-4 minutes.

source benchmarks/device_setup.sh || exit 1
[ -f .megatron-lm/pretrain_gpt.py ] || { echo "no .megatron-lm/pretrain_gpt.py: carry .megatron-lm (see above)"; exit 1; }
export CUDA_DEVICE_MAX_CONNECTIONS=1
checkpoint=/tmp/pretrain_gpt_checkpoint
rm -rf "$checkpoint"
common=(--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 512
  --max-position-embeddings 512 --micro-batch-size 8 --global-batch-size 8 --train-iters 40
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 4 --lr-decay-iters 40
  --weight-decay 0.1 --clip-grad 1.0 --bf16 --use-distributed-optimizer --seed 1234
  --mock-data --tokenizer-type NullTokenizer --vocab-size 1024
  --transformer-impl local --no-gradient-accumulation-fusion
  --log-interval 1 --eval-iters 0 --eval-interval 1000)
magma=(--magma --magma-keep-prob 0.5 --magma-block tensor)

pretrain() {  # NAME PORT ARGS...: one single-GPU torchrun of pretrain_gpt.py through magma_ext's route
  local name=$1 port=$2
  shift 2
  timeout 300 torchrun --nproc-per-node 1 --master-port "$port" -m magma_ext.megatron.training \
    .megatron-lm/pretrain_gpt.py "${common[@]}" "$@" > "$logs/pretrain_gpt_$name.log" 2>&1
}

pretrain magma 29501 "${magma[@]}" & uninterrupted=$!
pretrain magma_saved 29502 "${magma[@]}" --save "$checkpoint" --save-interval 20 --exit-interval 20 & saved=$!
pretrain adam 29503 & adam=$!
for pid in $uninterrupted $saved $adam; do wait "$pid"; note $?; done
echo "first three runs done at ${SECONDS} s (status $status)"
pretrain magma_resumed 29504 "${magma[@]}" --load "$checkpoint"
note $?
echo "resumed run done at ${SECONDS} s"
for name in magma magma_saved magma_resumed adam; do echo "== $name"; tail -3 "$logs/pretrain_gpt_$name.log"; done
python3 benchmarks/pretrain_gpt_summary.py "$logs" "$checkpoint" | tee "$logs/pretrain_gpt_${gpu_tag}_${day}.md"
note "${PIPESTATUS[0]}"
exit $status
