"""Stand-in for `mamba_ssm.ops` (tests only)."""
