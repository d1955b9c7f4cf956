#!/usr/bin/env bash
# The GPU runs of issue 6 (and of issues 5 and 7), as sent to the 2 x H200 device machine.
#
#   bash benchmarks/h200.sh OUTDIR [run.py args...]             our variants, one lane per GPU
#   WITH_OTHERS=1 bash benchmarks/h200.sh OUTDIR [run.py args...]
#       our variants on GPU 0 while benchmarks/quantized.py (issue 7) runs on GPU 1, then
#       benchmarks/scaling.py (issue 5) on both GPUs, cut at TOTAL_S seconds (default 560) after the start
#
# Installs the carried wheels (.whl: transformers 4.57.6, tokenizers 0.22.1, huggingface-hub 0.36.0,
# qwix 0.1.8) into /tmp/site, used by the JAX processes only; PyTorch keeps the machine's own
# transformers. Works in /tmp/bench; OUTDIR receives env.txt, results.json, run.tgz (every
# per-variant JSON and log) and the other scripts' JSON and logs: few files, as the tool returns 8.
set -u
out=$1; shift
work=/tmp/bench
mkdir -p "$out" "$work"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# Liger kernels (PyTorch processes) go to their own folder: /tmp/site's transformers 4.57 is for JAX only.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v liger_kernel) >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/liger \
    .whl/liger_kernel-*.whl >>"$work/pip.log" 2>&1 && export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import sys, jax, flax, torch, peft, transformers; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "peft", peft.__version__, "transformers(torch)", transformers.__version__)'
  PYTHONPATH=/tmp/site python3 -c 'import transformers; print("transformers(flax)", transformers.__version__)'
  python3 -c 'import liger_kernel, importlib.metadata as m; print("liger-kernel", m.version("liger-kernel"))'
  nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw,power.limit --format=csv
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
gpus=${GPUS:-0}
if [ -n "${WITH_OTHERS:-}" ]; then
  gpus=0
  (CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site:. timeout "${QUANT_TIMEOUT:-300}" \
    python3 benchmarks/quantized.py --out "$out/quantized.json" >"$out/quantized.log" 2>&1
   echo "exit $?" >>"$out/quantized.log") &
fi
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/run.py --out "$work/run" --gpus "$gpus" --flax-site /tmp/site "$@"
wait
if [ -n "${WITH_OTHERS:-}" ]; then
  left=$(( ${TOTAL_S:-560} - SECONDS ))  # what the device call has left for the last script
  [ "$left" -gt 30 ] || left=30
  PYTHONPATH=. timeout "$left" \
    python3 benchmarks/scaling.py --devices 1,2 --out "$out/scaling.json" >"$out/scaling.log" 2>&1
  echo "exit $?" >>"$out/scaling.log"
  tail -n 30 "$out/quantized.log" "$out/scaling.log"
fi
tar czf "$out/run.tgz" -C "$work" run
cp "$work/run/results.json" "$out/"
