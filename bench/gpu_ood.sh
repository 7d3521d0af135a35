#!/usr/bin/env bash
# Every GPU figure of the OOD issue in one go, each naming its device (estimated at 6 minutes on one H200
# from the pieces timed there on 2026-11-27: training 216 s side by side, the two benches about 2 minutes).
#
#   bash bench/gpu_ood.sh            # one GPU: three demo models trained side by side, then the tables
#   bash bench/gpu_ood.sh --tiny     # the same steps with tiny settings on the CPU (a check that they run)
#
# 1. python -m train --recipe demo for ResNet-18 at 128 px and ResNet-50 at 128 and 224 px, in parallel
#    (the GPU has room; the loaders share the CPU cores), each into its own run folder under $RUNS.
# 2. bench/ood_quality.py on the three models: ROC-AUC, photos accepted, lesions rejected by source, cost,
#    and on a GPU the cost inside the pass.
# 3. bench/ood_cost.py: the default detector stage by stage against packed, every detector, and the
#    operations each dispatches, per architecture.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu-ood}
if [[ "${1:-}" == "--tiny" ]]; then
    DEVICE=cpu WORKERS=1 SMALL=64 LARGE=80 BIG=resnet18 EXTRA=(--epochs=1) REPS=3
else
    DEVICE=cuda WORKERS=5 SMALL=128 LARGE=224 BIG=resnet50 EXTRA=() REPS=30
fi
started=$SECONDS
$PY -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
mkdir -p "$RUNS"
echo; echo "== 1. training three demo models side by side ($DEVICE, $WORKERS loader workers each)"
train() {  # name, options...
    local name=$1
    shift
    (
        s=$SECONDS
        $PY -m train --recipe demo --out "$RUNS/$name" --device="$DEVICE" --num-workers="$WORKERS" "${EXTRA[@]}" "$@" \
            >"$RUNS/$name.log" 2>&1
        echo "$name: exit $? in $((SECONDS - s)) s ($RUNS/$name.log)"
    ) &
}
# Numbered names: with --tiny two of the three are the same architecture at the same size.
train 1-resnet18-$SMALL --arch=resnet18 --image-size="$SMALL"
train 2-$BIG-$SMALL --arch="$BIG" --image-size="$SMALL"
train 3-$BIG-$LARGE --arch="$BIG" --image-size="$LARGE"
wait
checkpoints=()
for run in 1-resnet18-$SMALL 2-$BIG-$SMALL 3-$BIG-$LARGE; do
    [[ -f "$RUNS/$run/model.pt" ]] && checkpoints+=(--checkpoint "$RUNS/$run/model.pt")
done
echo; echo "== 2. bench/ood_quality.py"
$PY -m bench.ood_quality "${checkpoints[@]}" --device "$DEVICE" --reps "$REPS"
echo; echo "== 3. bench/ood_cost.py"
$PY -m bench.ood_cost --device "$DEVICE" --reps "$REPS" --models "resnet18@$SMALL,$BIG@$SMALL,$BIG@$LARGE"
echo; echo "gpu_ood: all figures in $((SECONDS - started)) s"
