"""Optimisation pieces of OFA's fork of fairseq that stock fairseq lacks.

Importing this package replaces fairseq's ``polynomial_decay`` learning-rate scheduler by a
subclass that also takes OFA's ``--warmup-ratio`` (see :mod:`.polynomial_decay_schedule`).
"""
from . import polynomial_decay_schedule  # noqa: F401
