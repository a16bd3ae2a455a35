"""Side-by-side benchmarks of rayx against Ray, Dask, loky and ProcessPoolExecutor.

Run `python -m bench --quick` from the repository root; `python -m bench --help` for options.
Each workload lives in its own module (startup, tasks, actors, objects, sklearn_jobs,
executor_map, dask_workloads, multinode); harness.py holds what they share, and
pipeline.py runs every case in a fresh process, one measuring at a time.
"""
