#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py): XIV and IDKL step time, images/s, peak memory
# and first-batch loss per precision, train-loader throughput, DDP scaling (2+ GPUs) and the SYSU
# report time, in one table, in under 8 minutes.
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry      # anywhere: tiny sizes on the CPU (proves it runs)
# Python: $PYTHON, else the repository's .venv, else python3 on the PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$repo"
# --dry on a CPU: some VMs advertise AMX, whose oneDNN bf16 kernels give wrong, run-to-run
# different results there (17 % feature error on ResNet-50); cap the ISA unless the user set one
for arg in "$@"; do
  if [[ "$arg" == --dry ]]; then export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX512_CORE_BF16}"; fi
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM 470 "$PYTHON" "$here/gpu_check.py" "$@"
