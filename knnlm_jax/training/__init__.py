"""Training the Transformer: optimizers, the run directory's data and config, the loop.
Never imports retrieval, datastores or evaluation."""
