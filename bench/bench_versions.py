"""Two versions of loralab side by side: fused and one-after-another training, interleaved.

    git worktree add /tmp/before e61cb6e
    python bench/bench_versions.py --before /tmp/before/src --after src --rounds 2

Each round trains bench_fused's 8 runs (tiny base, r 2-16 x lr 1e-3/3e-3, micro batch 1) fused
in one process and one after another in one process, first with the ``--before`` sources, then
with the ``--after`` sources, and prints one JSON line per (round, version): wall and CPU
seconds of each process and the final eval losses. Interleaving puts both versions under the
same load; CPU seconds are the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="the older version's src directory")
    ap.add_argument("--after", required=True, type=Path, help="the newer version's src directory")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    for rnd in range(args.rounds):
        for version, src in (("before", args.before), ("after", args.after)):
            bench_fused.ENV["PYTHONPATH"] = str(src.resolve())
            fused = bench_fused.measure("fused", "builtin:tiny", 8, args.steps, tmp, f"{version}-fused-{rnd}")
            seq = bench_fused.measure("sequential", "builtin:tiny", 8, args.steps, tmp, f"{version}-seq-{rnd}")
            print(json.dumps({
                "round": rnd, "version": version,
                "fused_wall_s": fused["wall_s"], "fused_cpu_s": fused["cpu_s"],
                "sequential_wall_s": seq["wall_s"], "sequential_cpu_s": seq["cpu_s"],
                "fused_final_eval_loss": fused["final_eval_loss"],
                "sequential_final_eval_loss": seq["final_eval_loss"],
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
