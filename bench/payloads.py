"""What the benchmarks run inside workers. Workers import this module and nothing else of
bench/, so the harness (psutil, subprocess, ...) never adds to a worker's memory or start-up."""

from __future__ import annotations


def one() -> int:
    return 1


def noop(x=None) -> None:
    return None


def square(x: int) -> int:
    return x * x


class Counter:
    def __init__(self):
        self.n = 0

    def inc(self) -> int:
        self.n += 1
        return self.n


def make_array(mb: int):
    import numpy as np

    return np.arange(mb * 1024 * 1024 // 8, dtype=np.float64)


def touch(x) -> float:
    return float(x[::512].sum())  # one float64 per 4 KiB page


def make_partition(i: int, rows: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(i)
    return pd.DataFrame({"k": rng.integers(0, 100, rows), "v": rng.random(rows),
                         "w": rng.random(rows)})
