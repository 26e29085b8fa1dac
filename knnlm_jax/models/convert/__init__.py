"""Weights from elsewhere: GGUF and Hugging Face directories (Llama family), fairseq checkpoints."""
