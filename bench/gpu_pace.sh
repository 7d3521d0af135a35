#!/usr/bin/env bash
# Every GPU figure of the prediction- and epoch-pace benchmarks ("score at the hardware's pace") in one go, each naming its device.
#
#   bash bench/gpu_pace.sh            # one GPU: ResNet-50, 224 px, random weights; well under 4 minutes on an H100
#   bash bench/gpu_pace.sh --tiny     # the same scripts with tiny settings on the CPU (a check that they run)
#
# 1. bench/predict_pace.py: one prediction vs a bare forward; predict_batch from decoded images and from
#    JPEG files vs a bare batched forward.
# 2. bench/epoch_pace.py: a real training run on a 10,000-image HAM10000-layout folder; epoch wall
#    time vs what the bare step rate implies.
# 3. bench/train_throughput.py: the cached data pipeline vs the training step, on the same kind of folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--tiny" ]]; then
    DEVICE=cpu ARCH=resnet18 SIZE=64 IMAGES=120 WORKERS=2 BATCH=16 PBATCH=8 CHUNKS=2 REPS=3 STEPS=2 EPOCHS=2
else
    DEVICE=cuda ARCH=resnet50 SIZE=224 IMAGES=10000 WORKERS=14 BATCH=128 PBATCH=64 CHUNKS=8 REPS=30 STEPS=20 EPOCHS=3
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lesion-gpu-pace-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS
$PY -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

echo; echo "== 1. prediction: one image and batches ($DEVICE)"
$PY -m bench.predict_pace --arch "$ARCH" --image-size "$SIZE" --device "$DEVICE" --reps "$REPS" --batch "$PBATCH" --chunks "$CHUNKS"

echo; echo "== 2. epochs at the step's pace ($IMAGES images, $WORKERS workers)"
$PY -m bench.epoch_pace --images "$IMAGES" --arch "$ARCH" --image-size "$SIZE" --batch-size "$BATCH" \
    --num-workers "$WORKERS" --epochs "$EPOCHS" --device "$DEVICE"

echo; echo "== 3. cached pipeline vs the training step"
$PY -m bench.ham_folder "$WORK/ham" --images "$IMAGES"
$PY -m bench.train_throughput --data "$WORK/ham" --arch "$ARCH" --image-size "$SIZE" --batch-size "$BATCH" \
    --batches "$STEPS" --workers "$WORKERS" --device "$DEVICE"
echo; echo "gpu_pace: all figures in $((SECONDS - started)) s"
