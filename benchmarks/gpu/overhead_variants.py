"""Where kvserve's serving overhead comes from: configs/gpu.yaml with one knob changed at a time.

Owns the diagnostic behind issue 2's c=64 TTFT gap: writes one Serve config per variant (the base,
replica streaming without chunk merging, one ingress replica, round-robin routing) and runs
``serving_overhead.py --systems kvserve`` on each, so each variant's TTFT/ITL/throughput lands in
its own JSON beside the others. Compare with a ``vllm_serve`` run of serving_overhead.py.

Usage (GPU machine, as serving_overhead.py):
    python3 benchmarks/gpu/overhead_variants.py --variants base,no_chunk_merge --out-dir $OUT
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serve_app.kuberay.targets import merge_patch

#: variant -> patch of the first application's args (model patches go to the first model).
VARIANTS = {
    "base": {},
    "no_chunk_merge": {"model": {"stream_chunks_per_s": 0}},
    "one_ingress": {"args": {"ingress": {"deployment": {"num_replicas": 1}}}},
    "round_robin": {"args": {"routing": {"strategy": "round-robin"}}},
}


def write_variant(base_config: Path, name: str, work: Path) -> Path:
    doc = yaml.safe_load(base_config.read_text())
    args = doc["applications"][0]["args"]
    patch = VARIANTS[name]
    args = merge_patch(args, patch.get("args", {}))
    args["models"][0] = merge_patch(args["models"][0], patch.get("model", {}))
    doc["applications"][0]["args"] = args
    path = work / f"gpu-{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpu.yaml")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--work-dir", default="/tmp/kvserve-variants")
    p.add_argument("--prompts-c1", default="20")
    args = p.parse_args()
    work, out = Path(args.work_dir), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        cfg = write_variant(ROOT / args.config, name, work)
        cmd = [sys.executable, str(ROOT / "benchmarks/gpu/serving_overhead.py"), "--config", str(cfg),
               "--systems", "kvserve", "--prompts-c1", args.prompts_c1, "--start-timeout", "300",
               "--bench-timeout", "150", "--out", str(out / f"overhead_{name}.json"), "--work-dir", str(work / name)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
        subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        subprocess.run(["pkill", "-9", "-f", "[h]aproxy"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
