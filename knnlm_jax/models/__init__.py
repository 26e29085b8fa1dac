"""The LMs: the Transformer with adaptive input and softmax, the Llama family, the pure train/eval steps;
``convert/`` loads GGUF, Hugging Face and fairseq weights. Never imports FAISS, datastores or evaluation."""
