"""Metrics that study SAEs: pure functions over tensors and SAEs (dark matter, dictionary
statistics, sign, dense-latent and group-rank helpers)."""
