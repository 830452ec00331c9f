"""The timing side of benchmarks/compare_torch.py: one framework per process.

A worker builds its step, warms it up, then answers the driver on
stdin/stdout, one JSON line per request after the marker ``BENCH``:
'<n>' times n steps, 'quit' reports the process's peak RSS and ends. Only one
worker runs steps at a time, so rounds of the two can be interleaved, and
each one's RSS is its own.
"""

import json
import resource
import sys
import time
from typing import Callable

MARKER = 'BENCH '


def reply(**fields) -> None:
  print(MARKER + json.dumps(fields), flush=True)


def serve(run_steps: Callable[[int], None]) -> None:
  """``run_steps(n)`` runs n steps and returns once they are done (not merely dispatched)."""
  start = time.perf_counter()
  run_steps(2)  # Compile and warm up.
  reply(ready=True, warmup_seconds=time.perf_counter() - start)
  for line in sys.stdin:
    request = line.strip()
    if request == 'quit':
      break
    steps = int(request)
    start = time.perf_counter()
    run_steps(steps)
    reply(seconds=time.perf_counter() - start, steps=steps)
  # Linux reports ru_maxrss in KiB.
  reply(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
