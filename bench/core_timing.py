"""Timings of the search core that unit tests must not assert: the analytic cost model per
architecture, and how long an unreachable database server takes to be reported.

    .venv/bin/python bench/core_timing.py

Prints one JSON object: `estimate_ms` (mean milliseconds of `spvit.cost.estimate` over 200
architectures sampled from the ImageNet space; the search prices every proposal with it, so it
should stay well below a millisecond or two) and `unreachable_db_s` (seconds until
`nas.storage.make_storage` gives up on a PostgreSQL port nobody listens on; bounded by its
`connect_timeout`, 10 s by default).
"""

from __future__ import annotations

import json
import random
import socket
import tempfile
import time
from pathlib import Path

from nas.storage import make_storage
from search_spaces import SearchSpace
from spvit.cost import estimate
from spvit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def estimate_ms(n: int = 200) -> float:
    space = SearchSpace.load(ROOT / "search_spaces" / "imagenet.yaml")
    specs = [space.sample(random.Random(i)) for i in range(n)]
    start = time.perf_counter()
    for spec in specs:
        estimate(spec)
    return 1e3 * (time.perf_counter() - start) / n


def unreachable_db_s() -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            make_storage(f"postgresql://nas:secret@127.0.0.1:{port}/nas", tmp)
        except ConfigError:
            pass
    return time.monotonic() - start


if __name__ == "__main__":
    print(json.dumps({"estimate_ms": round(estimate_ms(), 4),
                      "unreachable_db_s": round(unreachable_db_s(), 2)}))
