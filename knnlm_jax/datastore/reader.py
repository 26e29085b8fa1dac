"""The one way a reader (evaluate, generate, any later reader) opens a datastore (no JAX).

It cannot skip a check: the datastore must be complete, built by exactly this model (key
dimension, key type, vocabulary or tokenizer, and the weights' fingerprint), and a random
sample of its keys and values must still match the hashes recorded when it was built.
"""

from __future__ import annotations

from knnlm_jax.datastore.content_hash import sample_content
from knnlm_jax.datastore.format import Datastore, ModelSignature, open_datastore


def open_for_model(directory: str, signature: ModelSignature, log=None) -> Datastore:
    """Open the datastore at ``directory`` for the model ``signature`` describes, checked.

    ``signature.fingerprint`` (the loaded weights') is required. ``log`` gets one line saying
    what the sampled content check covered.
    """
    if not signature.fingerprint:
        raise TypeError("open_for_model needs the loaded weights' fingerprint in the signature")
    store = open_datastore(directory, signature)
    checked = sample_content(store)
    if log is not None:
        log(f"datastore {store.name}: {checked}")
    return store
