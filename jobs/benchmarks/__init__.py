"""The benchmarks behind jobs/benchmark.py, one module each; jobs/ is on sys.path when that script runs."""
