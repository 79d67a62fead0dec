"""Commands that drive whole runs: sweep, per-layer sensitivity, auto-exclude."""
