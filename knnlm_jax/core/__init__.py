"""The runtime every layer stands on: process setup and collectives, a watched child per process of a
launch, checkpoints, locks, Ctrl-C,
JSON reports, file hashes, command hints. Imports nothing else of the package (``configs`` aside)."""
