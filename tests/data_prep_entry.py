"""Test-only launcher entry for tests/test_data_prepare.py: the module entry ``dsft.run`` with

- the data preparation slowed by ``DSFT_TEST_SLOW_PREPARE_S`` seconds: a sleep inside the cache's preparation on
  the process that prepares (local rank 0), before the real tokenizing. The tests need preparation to outlast
  ``ddp_timeout`` on any machine; a dataset sized to take that long took 8-20 s depending on the machine and its
  load (the bound failed on a fast, idle one), where a sleep lasts as long everywhere and costs no CPU;
- every rank's wait for the cache timed and printed to stderr (``dsft-test: rank R waited S s for the cache``):
  the waiting rank logs at WARNING only, and the test asserts that it waited longer than ddp_timeout.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import dsft.data
    from dsft.run import main as launch_main

    delay = float(os.environ.get("DSFT_TEST_SLOW_PREPARE_S", "0"))
    real_build, real_wait = dsft.data._build_splits, dsft.data.wait_for_cache

    def slow_build(cfg, tokenizer, *scratch):  # inside dsft.data_cache.preparing(): heartbeat on, status written
        time.sleep(delay)
        return real_build(cfg, tokenizer, *scratch)

    def timed_wait(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return real_wait(*args, **kwargs)
        finally:
            print(f"dsft-test: rank {os.environ.get('RANK')} waited {time.monotonic() - t0:.1f} s for the cache",
                  file=sys.stderr, flush=True)

    # both are looked up in dsft.data's namespace when dsft.data.prepare_data runs
    dsft.data._build_splits = slow_build
    dsft.data.wait_for_cache = timed_wait
    return launch_main()


if __name__ == "__main__":
    sys.exit(main())
