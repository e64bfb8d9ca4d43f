"""fairseq tasks of mue_fairseq (``snli_ve``, ``caption``).

Imported as ``mue_fairseq.tasks``, never as top-level ``tasks``: an installed copy has this
folder inside the package (setup.py maps it), and in a source checkout mue_fairseq/__init__.py
loads it under that name. Every module here is imported by ``import mue_fairseq``, so a task
registers itself with ``@register_task`` at module level. Import siblings relatively
(``from .x import y``) or as ``mue_fairseq.tasks.x``, never as ``tasks.x``.
"""
