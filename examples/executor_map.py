"""`RayxExecutor().map(...)`: the concurrent.futures idiom, each call a rayx task.

Counts the primes below 2,000,000 in 40 ranges, in parallel, then checks the total against a
known value. Run it with `python examples/executor_map.py`.
"""

from __future__ import annotations

import math
import time

from rayx_futures import RayxExecutor

LIMIT = 2_000_000
CHUNKS = 40


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi), by trial division: deliberately CPU-bound Python."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0 and n != 2:
            continue
        if all(n % d for d in range(3, math.isqrt(n) + 1, 2)):
            count += 1
    return count


def main() -> None:
    """Map count_primes over the ranges; the executor starts and stops a local cluster."""
    step = LIMIT // CHUNKS
    bounds = [(i * step, (i + 1) * step) for i in range(CHUNKS)]
    start = time.perf_counter()
    with RayxExecutor() as executor:  # max_workers defaults to the cluster's CPUs
        counts = list(executor.map(count_primes, *zip(*bounds, strict=True)))
        workers = executor._max_workers
    total = sum(counts)
    print(f"{CHUNKS} calls on {workers} workers in {time.perf_counter() - start:.1f} s")
    print(f"primes below {LIMIT:,}: {total:,}")
    assert total == 148_933, total  # pi(2,000,000)


if __name__ == "__main__":
    main()
