"""CLLM4Rec's loss settings, kept apart from the model so that reading a run config stays light."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossConfig:
    """The loss settings; also the `loss` section of the run config (trainer/config.py)."""

    lambda_c: float = 1.0  # mutual-regularization strength (reference: 1, with SUM over tokens)
    lambda_l: float = 0.0  # optional Gaussian prior on the collab rows of each document (reference: 0)
    # Positions per chunk of the vocabulary head's cross-entropy (VocabCrossEntropy). 0: the naive
    # way, full-vocabulary logits of every position of the batch kept for backward (for comparison).
    vocab_chunk: int = 1024
