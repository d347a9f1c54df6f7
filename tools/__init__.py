"""Tools around the loop: sweeps of iterate.py runs (python -m tools.sweep)."""
