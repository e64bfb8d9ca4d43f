"""OFA's text cleaning (``OFADataset.pre_caption``) and caption target cleaning."""
import re
import string
from typing import List, Optional

_PUNCT_TABLE = str.maketrans({c: None for c in string.punctuation})
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: Optional[int] = None) -> str:
    """Lowercase; strip leading ``,.!?*#:;~``; ``-`` and ``/`` → space; ``<person>`` → person;
    collapse runs of whitespace; strip; keep at most ``max_words`` space-separated words."""
    caption = (
        caption.lower()
        .lstrip(",.!?*#:;~")
        .replace("-", " ")
        .replace("/", " ")
        .replace("<person>", "person")
    )
    caption = _MULTI_SPACE.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if max_words is not None and len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def strip_punctuation(text: str) -> str:
    """Remove every ``string.punctuation`` character and surrounding whitespace."""
    return text.translate(_PUNCT_TABLE).strip()


def caption_train_target(caption: str, max_words: int) -> str:
    """Training target: punctuation removed, at most ``max_words`` whitespace-separated words."""
    return " ".join(strip_punctuation(caption).split()[:max_words])


def caption_references(caption: str) -> List[str]:
    """``&&``-joined references → cleaned list (whitespace collapsed, punctuation removed)."""
    caption = " ".join(caption.strip().split())
    return [strip_punctuation(ref) for ref in caption.split("&&")]
