#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/device/README.md for shipping the wheel parts first). Build the parts
# with Ray's metrics agent's missing dependency, so that the kvserve_stage_* histograms can be scraped there:
# (--part-mib 32: with the repository's ~30 MB of tracked files a call of one part stays under the device's 64 MiB)
#   ../shared/device/make-wheelhouse --part-mib 32 --extra opencensus==0.11.4 --extra opencensus-context==0.1.3 \
#       --extra six==1.17.0 && cp .whl/install-on-device .whl/p0/
# and install googleapis-common-protos==1.76.0 and google-api-core==2.44.0 (--no-deps) beside them: opencensus
# imports google.rpc, and without it the dashboard agent fails its imports and `ray start` times out.
# The head-to-head's --profile (benchmarks/routing_h2h/profile.py) needs py-spy there too: put its manylinux wheel
# beside them (pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12
# -d .whl/extra py-spy==0.4.3).
# and prepare the model shape it carries: kvserve prepare-model --shape llama-3.1-8b --model-dir .models
# Usage:
#   bash benchmarks/gpu/run_on_device.sh LIMIT_S SCRIPT-AND-ARGS...
#   bash benchmarks/gpu/run_on_device.sh LIMIT_S -m MODULE ARGS...     (a module: python3 -m MODULE ARGS...)
# A --git-commit among the args must be a literal SHA (run `git rev-parse HEAD` on the developer's machine and
# paste it): the device's copy of the repository has stale git metadata, so `$(git rev-parse HEAD)` in the
# command, evaluated there, names an old commit.
# installs the wheels once per machine, sets the paths (repo, /tmp/site, the carried model dir .models), runs
# the script under `timeout LIMIT_S` (its output also kept in /tmp/res/work/<script>-<time>.log), then copies
# /tmp/res (results kept across calls) and the logs under /tmp/res/work to $OUT. The wheel parts may include a
# folder of extra wheels (/tmp/parts/pextra: the googleapis/api-core pair above); install-on-device takes every p*/.
# Engine caches: an engine's first start on a fresh machine took ~220 s against ~75 s on a warm one (the H100 logs of
# 2026-12-06: torch.compile 13 s against 2 s, then ~96 s after CUDA graph capture, none warm, in which FlashInfer
# builds its sampling ops with nvcc). What a warm machine keeps is under $HOME: vLLM's compile cache, FlashInfer's JIT
# builds and autotune file, Triton's kernels. KVSERVE_SAVE_ENGINE_CACHES=1 on a call packs them into
# $OUT/engine-caches.tgz after its run; copied to .carry/engine-caches.tgz (git-ignored, carried with .carry) it is
# unpacked into $HOME before a new machine's first run, its files dated now (-m): FlashInfer's JIT runs ninja, which
# rebuilds an object older than its freshly installed source.
cache_dirs=(.cache/vllm .cache/flashinfer .triton)
set -u
limit=$1; shift
if [ ! -f /tmp/site/.kvserve-installed ]; then
  bash /tmp/parts/p0/install-on-device >/dev/null && touch /tmp/site/.kvserve-installed || exit 1
fi
if [ -f .carry/engine-caches.tgz ] && [ ! -f /tmp/site/.engine-caches-restored ]; then
  tar xzmf .carry/engine-caches.tgz -C "$HOME" && touch /tmp/site/.engine-caches-restored \
    && echo "engine caches restored from .carry/engine-caches.tgz"
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH KVSERVE_MODEL_DIR=$PWD/.models PYTHONUNBUFFERED=1
mkdir -p /tmp/res/work
name=$1; [ "$1" = -m ] && name=$2   # the log is named after the script or the module
timeout "$limit" python3 "$@" 2>&1 | tee "/tmp/res/work/$(basename -- "$name" .py)-$(date +%s).log"
rc=${PIPESTATUS[0]}
if [ "${KVSERVE_SAVE_ENGINE_CACHES:-}" = 1 ]; then
  present=(); for d in "${cache_dirs[@]}"; do [ -d "$HOME/$d" ] && present+=("$d"); done
  [ ${#present[@]} -gt 0 ] && (cd "$HOME" && du -sh "${present[@]}" && tar czf "$OUT/engine-caches.tgz" "${present[@]}")
fi
cp /tmp/res/*.json "$OUT"/ 2>/dev/null
tar czf "$OUT/logs-$(date +%s).tgz" -C /tmp/res work 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
exit $rc
