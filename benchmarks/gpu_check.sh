#!/usr/bin/env bash
# One prepared run on a CUDA machine: unit tests with CUDA visible, then the
# throughput benchmark with a PyTorch YOLOv8n (random weights) on synthetic images. Wheels the GPU image
# lacks travel in .whl/ (ignored by git); results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD YOLO_OFFLINE=1 YOLO_CONFIG_DIR=/tmp/ycfg HF_HUB_OFFLINE=1 YOLO_VERBOSE=False PYTHONUNBUFFERED=1
mkdir -p /tmp/ycfg/Ultralytics
cp "$(python3 -c 'import matplotlib,os;print(os.path.join(matplotlib.get_data_path(),"fonts/ttf/DejaVuSans.ttf"))')" /tmp/ycfg/Ultralytics/Arial.ttf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch,timm,faiss,ultralytics;print("torch",torch.__version__,"cuda",torch.cuda.is_available(),"timm",timm.__version__,"faiss",faiss.__version__,"ultralytics",ultralytics.__version__)'
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
timeout 150 python3 benchmarks/index_throughput.py --synthetic 512 --detector-weights yaml:yolov8n --batch-size 64 \
  --workers 8 --device cuda --out "$OUT/index_throughput-cuda.json" 2>&1 | tail -20
timeout 200 python3 benchmarks/train_smoke.py --accelerator gpu --epochs 4 --out "$OUT/train_smoke-cuda.json" 2>&1 | grep -v "^INFO\|warn" | tail -30
