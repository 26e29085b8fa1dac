"""Text to token ids: corpus specs and sources (WikiText, the embedded corpus, TFDS), word and subword
vocabularies, cached token arrays, LM blocks and context windows. No JAX, no FAISS."""
