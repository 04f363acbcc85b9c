"""The engine's fitting defaults, one place for ``ligo grow``, ``ligo estimate``, the API and the form.

Free of torch, so that the API process and the cost estimate can read them.
"""

DEFAULT_BATCH_SIZE = 16  # sequences per fitting step
DEFAULT_SEQ_LEN = 128  # tokens per fitting sequence (capped at the model's positions)
