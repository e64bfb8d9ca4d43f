"""fairseq criterions of mue_fairseq (label-smoothed CE, layer-wise task loss, SCST).

Imported as ``mue_fairseq.criterions``, never as top-level ``criterions``: an installed copy
has this folder inside the package (setup.py maps it), and in a source checkout
mue_fairseq/__init__.py loads it under that name. Every module here is imported by
``import mue_fairseq``, so a criterion registers itself with ``@register_criterion`` at module
level. Import siblings relatively (``from .x import y``) or as ``mue_fairseq.criterions.x``,
never as ``criterions.x``.
"""
from . import label_smoothed_cross_entropy  # noqa: F401,E402  (registers adjust_label_smoothed_cross_entropy)
from . import scst_loss  # noqa: F401,E402  (registers scst_reward_criterion)
