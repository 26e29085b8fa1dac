"""The runtime every layer stands on: process setup and collectives, checkpoints, locks, Ctrl-C,
JSON reports, file hashes, command hints. Imports nothing else of the package (``configs`` aside)."""
