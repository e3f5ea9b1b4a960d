"""Ground-truth synthetic data that extends ``sae_lens.synthetic``: bipolar features, a dense
low-rank component, multi-dimensional features, and recovery metrics."""
