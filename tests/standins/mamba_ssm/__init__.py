"""Stand-in for the `mamba_ssm` package (tests only; see tests/standins/README.md)."""
