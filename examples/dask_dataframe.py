"""A pandas groupby, scaled out through dask.dataframe with rayx as Dask's scheduler.

Builds a 2,000,000-row frame of sales, splits it into 16 partitions, and computes revenue per
store and product; the partial aggregations stay in rayx's object store until the result.
Run it with `python examples/dask_dataframe.py`.
"""

from __future__ import annotations

import time

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

import rayx
import rayx.dask


def make_sales(rows: int, seed: int = 0) -> pd.DataFrame:
    """Random sales: store, product, quantity and unit price."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "store": rng.integers(0, 20, rows),
        "product": rng.choice(["apple", "bread", "cheese", "dates"], rows),
        "quantity": rng.integers(1, 10, rows),
        "price": rng.uniform(0.5, 5.0, rows).round(2),
    })


def revenue_by_store_and_product(df):
    """The same pandas code works on a pandas frame and on a Dask frame."""
    df = df.assign(revenue=df.quantity * df.price)
    return df.groupby(["store", "product"]).revenue.sum()


def main() -> None:
    """Compute on rayx, compare with plain pandas, print the top rows."""
    rayx.init()
    sales = make_sales(2_000_000)
    ddf = dd.from_pandas(sales, npartitions=16)
    start = time.perf_counter()
    with dask.config.set(scheduler=rayx.dask.get):
        result = revenue_by_store_and_product(ddf).compute()
    elapsed = time.perf_counter() - start
    expected = revenue_by_store_and_product(sales)
    # Dask stores the product names as Arrow strings: compare the labels, not their dtype.
    pd.testing.assert_series_equal(result.sort_index(), expected.sort_index(),
                                   check_index_type=False)
    print(f"{ddf.npartitions} partitions on rayx in {elapsed:.2f} s; matches pandas")
    print(result.sort_values(ascending=False).head(5).round(2).to_string())
    rayx.shutdown()


if __name__ == "__main__":
    main()
