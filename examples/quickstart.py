"""rayx in one screen: tasks, an actor, and a large array shared through the object store."""

import numpy as np

import rayx


@rayx.remote
def square(x: int) -> int:
    return x * x


@rayx.remote
def column_sums(matrix: np.ndarray) -> np.ndarray:
    return matrix.sum(axis=0)


@rayx.remote
class Counter:
    def __init__(self):
        self.count = 0

    def add(self, n: int) -> int:
        self.count += n
        return self.count


def main() -> None:
    rayx.init()
    print("cluster:", rayx.cluster_resources())
    print("squares:", rayx.get([square.remote(i) for i in range(10)]))

    matrix = rayx.put(np.ones((1000, 1000)))  # stored once, read zero-copy by every task
    sums = rayx.get([column_sums.remote(matrix) for _ in range(4)])
    print("column sums agree:", all((s == 1000).all() for s in sums))

    counter = Counter.remote()
    for i in range(5):
        counter.add.remote(i)
    print("counter:", rayx.get(counter.add.remote(0)))
    rayx.shutdown()


if __name__ == "__main__":
    main()
