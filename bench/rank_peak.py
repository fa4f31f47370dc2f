"""One rank of a benchmark run: start `launch/train.py` with the given arguments as a child process, wait,
and write the child's peak RSS (from the kernel, over its whole life) to PEAK_DIR/rank<RANK>.json.

    torchrun ... bench/rank_peak.py PEAK_DIR --config run.yaml
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    peak_dir, args = Path(sys.argv[1]), sys.argv[2:]
    entry = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    code = subprocess.call([sys.executable, str(entry), *args])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    rank = int(os.environ.get("RANK", 0))
    (peak_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_bytes": peak_kib * 1024,
                                                           "exit_code": code}))
    sys.exit(code)
