"""fedseal benchmarks: ``python -m bench [NAME ...]`` runs bench/bench_NAME.py (all by default)."""
