#!/usr/bin/env bash
# LFW from scratch at 32x32 with a mechanism that forces the masks to follow content: one committed run
# folder per recipe (checkpoints/NAME), which a fresh checkout continues exactly with the same command.
#   benchmarks/content/run.sh NAME [ITERATIONS]     e.g. benchmarks/content/run.sh equivariance
# The recipes are the lines of the `case` below; every one trains tiny-32, K=4 (K=3 where named -k3),
# v-prediction, region codes, t = floor(T u^2), lr 2e-4, EMA 0.999, batch 32 (fdm-train's defaults where not named).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: run.sh NAME [ITERATIONS]}
iterations=${2:-13600}  # 435,200 images: the bundled model's budget over its three stages
regions=4
case "$name" in
  plain-k4)      extra=() ;;
  equivariance)  extra=(--mask-equivariance 1) ;;
  information)   extra=(--mask-equivariance 0.1 --equivariance-measure information) ;;
  information-k3) extra=(--mask-equivariance 0.1 --equivariance-measure information); regions=3 ;;
  circular)      extra=(--padding circular --shift-augment 0.2 --shift-edges circular) ;;
  boundary)      extra=(--mask-boundary 0.1) ;;
  *) echo "unknown recipe $name" >&2; exit 2 ;;
esac
data=data_cache/lfw32.npy
[ -f "$data" ] || fdm-train prepare-data ../shared/data/lfw/train -o "$data" --image-size 32
exec fdm-train --data "$data" --out "benchmarks/content/checkpoints/$name" --resume auto \
  --preset tiny-32 --regions "$regions" --prediction v --lr 2e-4 --ema-decay 0.999 --batch-size 32 \
  --iterations "$iterations" --save-every 200 --sample-every 1000 --sample-steps 50 --channels-last "${extra[@]}"
