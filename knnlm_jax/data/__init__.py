"""Text to token ids: corpus specs and sources (WikiText, the embedded corpus, TFDS and preparing it), word and subword
vocabularies, cached token arrays, LM blocks and context windows. No JAX, no FAISS."""
