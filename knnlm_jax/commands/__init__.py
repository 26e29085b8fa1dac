"""The command-line tools: ``train``, ``build``, ``evaluate`` (``python train.py`` or ``knnlm-train``, ...)."""
