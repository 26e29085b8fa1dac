"""kNN-LM evaluation: settings (no JAX), the streaming pass and its per-token files, the continuous
cache, mixing and tuning, sweeps, the report and explorer, the n-gram baseline, staged outputs."""
