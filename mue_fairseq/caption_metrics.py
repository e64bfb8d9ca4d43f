"""Caption metrics as OFA reports them (``run_scripts/caption/coco_eval.py``: pycocoevalcap's
``COCOEvalCap``), computed from predictions and the references of the evaluation TSV.

``COCOEvalCap`` needs COCO-format annotation files; here the same scorers run on
``{image_id: [captions]}`` dicts directly, in COCOEvalCap's order and with its names:
PTB tokenizer (Stanford CoreNLP 3.4.1, bundled with pycocoevalcap; needs ``java``), then
``Bleu_1..4`` (``Bleu(4)``), ``METEOR``, ``ROUGE_L``, ``CIDEr`` (document frequencies from the
evaluated references, as COCOEvalCap) and ``SPICE``.

SPICE is computed only when it can run: pycocoevalcap's ``Spice()`` constructor *downloads*
Stanford CoreNLP 3.6.0 (about 400 MB) when ``spice/lib/stanford-corenlp-3.6.0.jar`` is
missing. :func:`spice_unavailable` checks for the two jars (and ``java``) without
constructing it; when something is missing, SPICE is left out and exactly one line
``SPICE skipped: <why>`` is printed. A SPICE run that fails (SPICE 1.0 needs Java 8) is
reported the same way. Nothing is ever invented in its place.
"""
import os
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence

SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _pycocoevalcap_dir() -> str:
    import pycocoevalcap

    return list(pycocoevalcap.__path__)[0]


def spice_unavailable() -> Optional[str]:
    """Why SPICE cannot run here (None when it can), checked without downloading."""
    if shutil.which("java") is None:
        return "java not found on PATH"
    spice_dir = os.path.join(_pycocoevalcap_dir(), "spice")
    if not os.path.isfile(os.path.join(spice_dir, "spice-1.0.jar")):
        return f"spice-1.0.jar not found in {spice_dir}"
    lib = os.path.join(spice_dir, "lib")
    missing = [jar for jar in SPICE_JARS if not os.path.isfile(os.path.join(lib, jar))]
    if missing:
        return (f"Stanford CoreNLP models not found ({', '.join(missing)} missing in {lib}; "
                "pycocoevalcap would download them on first use, this evaluation does not)")
    return None


def read_references(path: str, selected_cols, id_field: str = "id", caption_field: str = "caption",
                    fields: Sequence[str] = ("id", "image", "caption")) -> Dict[str, List[str]]:
    """``{id: [reference, ...]}`` from an evaluation TSV (all rows, not one rank's slice):
    the caption column split on ``&&``, whitespace collapsed, otherwise raw (the PTB
    tokenizer lowercases and drops punctuation). A repeated id collects every row's
    references."""
    from mue_fairseq.data.tsv import TSVReader

    reader = TSVReader(path, selected_cols, fields=fields, slice_id=0, slice_count=1)
    id_pos, cap_pos = list(fields).index(id_field), list(fields).index(caption_field)
    refs: Dict[str, List[str]] = {}
    for i in range(len(reader)):
        row = reader[i]
        captions = [" ".join(c.split()) for c in row[cap_pos].split("&&")]
        refs.setdefault(str(row[id_pos]), []).extend(c for c in captions if c)
    return refs


def caption_scores(predictions: Dict[str, str], references: Dict[str, List[str]],
                   spice: bool = True, log=print) -> Dict[str, float]:
    """COCOEvalCap's corpus scores of ``predictions`` (``{image_id: caption}``) against
    ``references`` (``{image_id: [captions]}``), over the predicted ids. SPICE as the module
    docstring says (``spice=False`` leaves it out silently)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(predictions)
    if not ids:
        return {}
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no references for predicted image id(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need java (pycocoevalcap's PTB tokenizer and METEOR)")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    scores: Dict[str, float] = {}
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
               (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    for scorer, names in scorers:
        score, _ = scorer.compute_score(gts, res)  # Meteor's java process ends with the object
        values = score if isinstance(score, list) else [score]
        for name, value in zip(names, values):
            scores[name] = float(value)
    if spice:
        why = spice_unavailable()
        if why is None:
            try:
                from pycocoevalcap.spice.spice import Spice

                score, _ = Spice().compute_score(gts, res)
                scores["SPICE"] = float(score)
            except (subprocess.CalledProcessError, OSError, ValueError) as e:
                why = f"the SPICE run failed ({e})"
        if why is not None:
            log(f"SPICE skipped: {why}")
    return scores
