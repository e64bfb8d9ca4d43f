"""Prefix trie over token sequences, used to constrain answers (OFA's ``utils/trie.py``)."""
from typing import Dict, Iterable, List, Sequence

import torch


class Trie:
    """Token-sequence trie. ``next_tokens(prefix)`` lists the tokens that may follow ``prefix``;
    a prefix that is not in the trie allows only ``eos`` (as in OFA)."""

    def __init__(self, eos: int):
        self.eos = eos
        self._root: Dict[int, dict] = {}

    def insert(self, sequence: Iterable[int]) -> None:
        node = self._root
        for token in sequence:
            node = node.setdefault(int(token), {})

    def next_tokens(self, prefix: Sequence[int]) -> List[int]:
        node = self._root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return [self.eos]
        return list(node.keys())

    # the name OFA's sequence generator calls
    get_next_layer = next_tokens

    def allowed_mask(self, prefix: Sequence[int], vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: True at the tokens allowed after ``prefix``."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.next_tokens(prefix)] = True
        return mask
