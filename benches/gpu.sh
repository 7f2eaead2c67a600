#!/usr/bin/env bash
# GPU checks and figures for to-fp8 and to-bf16, for a machine with CUDA, CPython >= 3.11 and torch
# but no Rust toolchain (and no network: typer, rich, numpy, safetensors, pytest and transformers
# are expected there already).
#
#   where the wheel is built:  maturin build --release -o dist     (one abi3 wheel, any CPython >= 3.11)
#   on the GPU machine:        bash benches/gpu.sh [GIB]           (GIB of generated bf16 weights, default 8)
#
# 1. installs the wheel from .whl/ or dist/ into a private folder (nothing else is touched);
# 2. runs the CUDA tests (GPU bytes == CPU bytes for both kernels and whole conversions);
# 3. generates a bf16 MoE checkpoint of about GIB, runs to-fp8 on the CPU and on the GPU, then to-bf16
#    of that FP8 output on the CPU and on the GPU, checks each GPU output equals the CPU output byte
#    for byte (every file), and prints each run's GB/s of source next to the speed of reading it.
# Exits non-zero on any failure or difference.
set -euo pipefail
cd "$(dirname "$0")/.."
GIB="${1:-8}"
export PYTHONUNBUFFERED=1

wheel="$(ls -t .whl/model_normalize-*.whl dist/model_normalize-*.whl 2>/dev/null | head -n 1 || true)"
[ -n "$wheel" ] || { echo "no model_normalize wheel in .whl/ or dist/: build one with 'maturin build --release -o dist'" >&2; exit 2; }
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench-XXXXXX")"
trap 'rm -rf "$work"' EXIT
site="$work/site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, normalize_core; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('normalize', normalize_core.__version__, 'from', normalize_core.__file__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())"

echo "== CUDA tests"
python3 -m pytest -q -rs -k "cuda or gpu" tests/test_fp8_quantize.py tests/test_bf16_dequantize.py tests/test_bf16_convert.py

layers="$(python3 -c "print(max(1, round(($GIB - 0.25) / 0.59)))")"  # ~0.59 GiB per layer, 0.25 GiB embeddings
python3 benches/to_fp8.py --write-source "$work/bf16" --layers "$layers" >/dev/null

now() { date +%s.%N; }
gbps() { python3 -c "print(f'{$1 / 1e9 / ($3 - $2):.2f} GB/s ({$3 - $2:.2f} s)')"; }
bytes_of() { du -cb "$1"/*.safetensors | tail -n 1 | cut -f1; }
read_speed() { local t0; t0="$(now)"; cat "$1"/*.safetensors >/dev/null; gbps "$(bytes_of "$1")" "$t0" "$(now)"; }

# run COMMAND SOURCE: CPU then GPU into $work/COMMAND-{cpu,cuda}; compare; print speeds.
run() {
  local command="$1" source="$2" device t0 t1
  echo "== $command: $(bytes_of "$source") source bytes; reading them (page cache): $(read_speed "$source")"
  for device in cpu cuda; do
    t0="$(now)"
    python3 -m normalize_core "$command" -s "$source" -o "$work/$command-$device" --device "$device" -q >/dev/null
    sync
    t1="$(now)"
    echo "   $command --device $device: $(gbps "$(bytes_of "$source")" "$t0" "$t1") of source, fsync and sync included"
  done
  diff -r -q "$work/$command-cpu" "$work/$command-cuda" || { echo "   GPU output differs from CPU output" >&2; exit 1; }
  echo "   GPU output == CPU output, byte for byte ($(ls "$work/$command-cpu" | wc -l) files)"
}

run to-fp8 "$work/bf16"
run to-bf16 "$work/to-fp8-cpu"
echo "== all GPU checks passed"
