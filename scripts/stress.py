#!/usr/bin/env python
"""Stress suite: fit simulated trace sets the fit was not built on, with its defaults.

    python scripts/stress.py [--sets NAME ...] [--seeds 0 1 2] [--quick] [--held-back]
        [--chains N --warmup N --draws N] [--out bench/out/stress]
        [--cache bench/out/stress-cache]

One row per set x seed (gate verdict, wall and sampling time, leapfrog steps per
iteration, divergences, % saturated trees, min bulk/tail ESS, min ESS/s, failing
parameters), also written to OUT/stress.csv and OUT/stress.md (held-back sets:
OUT/stress-held-back.*). The sets are calib.simulate.stress; see bench/README.md.
Exit 0 when every row passes its gate, 1 otherwise, 2 on a user error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stress.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
