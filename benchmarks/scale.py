"""Scale benchmarks (issue: index at fleet scale). Four parts, each printing a table and writing JSON:

    python benchmarks/scale.py engines --n 500       # Ray engine vs local engine on the same shared photos
    python benchmarks/scale.py indexes ...           # faiss index kinds at 100k / 1M realistic vectors
    python benchmarks/scale.py records --n 1000000   # index records: Arrow columns vs Python objects
    python benchmarks/scale.py plan --n 1000000      # the Ray engine's input blocks: Arrow vs Python rows

``engines``, ``records`` and ``plan`` write ``benchmarks/results/scale-{part}-cpu.json`` (``--json`` to
change it); ``indexes`` is ``benchmarks/scale_indexes.py`` (see its ``--help``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("engines", "indexes", "records", "plan"):
        print(__doc__)
        return 2
    part, rest = argv[0], argv[1:]
    if part == "indexes":
        import scale_indexes

        scale_indexes.main(rest)
        return 0
    out = ROOT / "benchmarks" / "results" / f"scale-{part}-cpu.json"
    if "--json" in rest:
        at = rest.index("--json")
        out, rest = Path(rest[at + 1]), rest[:at] + rest[at + 2 :]
    if part == "records":
        import scale_records

        result = scale_records.main(rest)
    elif part == "plan":
        import scale_plan

        result = scale_plan.main(rest)
    else:
        import scale_engines

        result = scale_engines.main(rest)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
