"""The kNN datastore: its on-disk format and manifest (no JAX), the resumable writer, content hashes,
codes-only stores, indexing, the build loop, ``--check``, the checked reader and search over a datastore."""
