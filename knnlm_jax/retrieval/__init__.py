"""Nearest neighbours: FAISS indexes and their merges, FAISS on GPUs, exact search on devices, the kNN
distribution, the fewer-search policies (RetoMaton, adaptive retrieval). Knows no datastore layout."""
