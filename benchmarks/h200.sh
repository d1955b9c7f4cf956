#!/usr/bin/env bash
# The GPU run of issue 6 (and the scaling / quantized scripts), as sent to the H200 device machine.
#
#   bash benchmarks/h200.sh OUTDIR [run.py args...]      e.g. bash benchmarks/h200.sh $OUT --suite all
#
# Works in /tmp/bench; OUTDIR receives env.txt, results.json, summary.md, plot.png and run.tgz (all
# per-variant JSON and logs), few files because the device tool returns at most 8.
# Installs the carried wheels (.whl: transformers 4.57.6, tokenizers 0.22.1, huggingface-hub 0.36.0,
# qwix 0.1.8) into /tmp/site, used by the JAX processes only; PyTorch keeps the machine's transformers.
set -u
out=$1; shift
work=/tmp/bench
mkdir -p "$out" "$work"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
{
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import sys, jax, flax, torch, peft, transformers; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "peft", peft.__version__, "transformers(torch)", transformers.__version__)'
  PYTHONPATH=/tmp/site python3 -c 'import transformers, qwix; print("transformers(flax)", transformers.__version__, "qwix", qwix.__version__ if hasattr(qwix, "__version__") else "?")'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
PYTHONPATH=. python3 benchmarks/run.py --out "$work/run" --gpus 0,1 --flax-site /tmp/site "$@"
tar czf "$out/run.tgz" -C "$work" run
cp "$work/run/results.json" "$work/run/summary.md" "$work/run/plot.png" "$out/" 2>/dev/null
