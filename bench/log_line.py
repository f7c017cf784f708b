"""What one ``request.done`` log line costs: CPU per line through the shipped log chain.

    python bench/log_line.py [--lines 20000]

``configure_logging`` as ``worker run`` sets it up (JSON lines, the secret scrubber), writing to
/dev/null, and the fields the consumer logs for an ``ok`` answer. CPU is this process's
(``time.process_time``), the median of five windows. Run it from another revision's tree to
compare (``git archive REV | tar -x -C DIR``, then ``python bench/log_line.py`` in DIR).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from bench.machine import describe
from worker.observe.logs import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    print(describe(), flush=True)
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull  # the chain binds the stream it finds at configure time
        configure_logging(json=True, secrets=["sk-bench-not-a-key-0123456789"])
        sys.stderr = sys.__stderr__
        log = structlog.get_logger("worker.consumer")
        windows = []
        for _ in range(5):
            started = time.process_time()
            for _ in range(args.lines):
                log.info(
                    "request.done", request_id=uuid.uuid4().hex, trace_id=uuid.uuid4().hex,
                    agent="writer", task_id="task-42", model="bench", outcome="ok", attempts=1,
                    fallback=False, tokens=69, prompt_tokens=5, completion_tokens=64,
                    cost_usd=0.000133, cached=False, latency_ms=12.345, provider_latency_ms=3.21,
                    reply="replied", dead_lettered=False, duplicate=False, budget_scope=None, error=None,
                )  # fmt: skip
            windows.append(1e6 * (time.process_time() - started) / args.lines)
    print(
        f"request.done {statistics.median(windows):.1f} us CPU/line (median of 5 windows of "
        f"{args.lines}, {min(windows):.1f}-{max(windows):.1f}; two uuid4 per line included)"
    )


if __name__ == "__main__":
    main()
