#!/bin/bash
# Every position figure of one model: LFW val plain and shifted by 19% with the LFW position prior, DAVIS
# (foreground) beside the LFW prior, and 64 empty gradients. One thread, about 6 minutes on the 2-core CPU;
# run with the project's environment active (fdm-infer and python on PATH).
#   benchmarks/position/evaluate.sh MODEL LABEL   -> benchmarks/results/position/*_LABEL.{json,md}
set -euo pipefail
cd "$(dirname "$0")/../.."
model=$1; label=$2; data=../shared/data; results=benchmarks/results/position
export OMP_NUM_THREADS=1
fdm-infer evaluate --threads 1 -q --model "$model" $data/lfw/val/images --masks $data/lfw/val/masks \
    --prior-from $data/lfw/val/masks --shift 0.19 --name "$label" -o $results/lfw_val_$label.json
fdm-infer evaluate --threads 1 -q --model "$model" $data/davis/images --masks $data/davis/masks \
    --protocol foreground --prior-from $data/lfw/val/masks --name "$label" -o $results/davis_${label}_lfw_prior.json
python benchmarks/empty_images.py --model "$model" --label "$label"
