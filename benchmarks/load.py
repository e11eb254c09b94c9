"""Load time and peak memory of the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) dequantized to
float32: Levante (open_checkpoint + build on meta + load_weights) against transformers
(`from_pretrained(gguf_file=...)`) on the same file. Each load runs in a fresh subprocess, so
neither inherits the other's imports, caches or memory; the file is read once beforehand so
both find it in the page cache.

    python benchmarks/load.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("levante", "transformers")


def _rss_mib() -> float:
    """Current resident set size (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _child(peer: str, path: Path) -> None:
    """One load; prints seconds, peak RSS and the RSS the imports alone took, as JSON."""
    import torch

    if peer == "levante":
        from levante.model import build_model
        from levante.weights import load_weights, open_checkpoint
    else:
        from transformers import AutoModelForCausalLM
    after_imports = _rss_mib()
    start = time.perf_counter()
    if peer == "levante":
        checkpoint = open_checkpoint(path)
        with torch.device("meta"):
            model = build_model(checkpoint.config)
        load_weights(model, checkpoint, dtype=torch.float32, device="cpu", progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "imports_mib": after_imports, "params": params}))


def _measure(peer: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", peer, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="loads per peer; the median is shown")
    parser.add_argument("--child", nargs=2, metavar=("PEER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return

    from levante.loader import demo_model_path

    path = demo_model_path()
    path.read_bytes()  # into the page cache, so the first peer does not pay for the disk
    runs = {peer: [_measure(peer, path) for _ in range(args.repeat)] for peer in PEERS}
    median = {peer: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for peer, rs in runs.items()}
    params = median["levante"]["params"]
    print(f"{path.name} -> float32: {params / 1e6:.1f}M parameters, {params * 4 / 2**20:.0f} MiB of weights")
    print(f"{'':14}{'load s':>9}{'peak RSS MiB':>14}{'after imports MiB':>19}")
    for peer, m in median.items():
        print(f"{peer:14}{m['seconds']:9.2f}{m['peak_mib']:14.0f}{m['imports_mib']:19.0f}")
    ours, theirs = median["levante"], median["transformers"]
    loading = {peer: m["peak_mib"] - m["imports_mib"] for peer, m in median.items()}
    print(
        f"transformers / levante: load time {theirs['seconds'] / ours['seconds']:.2f}x, "
        f"peak RSS {theirs['peak_mib'] / ours['peak_mib']:.2f}x, "
        f"peak RSS above imports {loading['transformers'] / loading['levante']:.2f}x"
    )


if __name__ == "__main__":
    main()
