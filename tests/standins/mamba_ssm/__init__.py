"""Stand-in for the `mamba_ssm` package (tests only; see tests/test_scan_substitutions.py)."""
