"""The command-line tools: ``train``, ``build``, ``evaluate``, ``generate`` (``python train.py`` or ``knnlm-train``, ...)."""
