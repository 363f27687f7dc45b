#!/usr/bin/env bash
# The GPU checks of stage 1 in one run (about 6 minutes on one H100/H200-class GPU): the device input path's
# tests on CUDA (nvJPEG pixels and the cached embeddings against the CPU path), then bench_features end to end
# vs model-only for a real-size open_clip ViT-B/16 and ViT-L/14 (random weights) on synthetic COCO-sized JPEGs,
# then the Ray engine (one actor per GPU, the cluster extra) against the local path on the same data.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # logs go to OUT_DIR (default: bench-gpu/)
#
# Needs torch + torchvision with CUDA, h5py, pyarrow, timm, transformers, typer, tqdm and open_clip_torch (+ its
# ftfy, wcwidth): on a machine without PyPI, carry their wheels and put them on PYTHONPATH first.
set -uo pipefail
OUT_DIR=${1:-bench-gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -m pytest -q tests/test_device_input.py 2>&1 | tee "$OUT_DIR/tests.log"
WORKERS=${WORKERS:-$(( $(nproc) > 12 ? 12 : $(nproc) ))}
for arch in ViT-B-16 ViT-L-14; do
  for decode in device cpu; do
    "$PY" bench/bench_features.py --teacher "openclip:$arch" --device cuda --manifest jpeg:1 --limit 4096 \
      --batch-size 512 --workers "$WORKERS" --decode "$decode" --repeats 2 \
      2>&1 | tee "$OUT_DIR/features-$arch-$decode.log"
  done
done
NGPU=$(nvidia-smi -L | wc -l)
"$PY" bench/bench_features.py --engine ray --teacher openclip:ViT-B-16 --device cuda --manifest jpeg:1 --limit 4096 \
  --batch-size 512 --workers "$WORKERS" --ray-loader-workers $(( WORKERS / NGPU > 1 ? WORKERS / NGPU : 1 )) \
  --ray-workers "$NGPU" --gpus-per-worker 1 --shard-size 512 --decode device --repeats 2 \
  2>&1 | tee "$OUT_DIR/features-ray.log"
grep -h "ratio Ray / local\|actor start" "$OUT_DIR/features-ray.log"
grep -h "ratio end to end\|model only (baseline)\|run_feature_job (end to end)\|^device" "$OUT_DIR"/features-*.log
