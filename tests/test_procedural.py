"""Tests for the procedural vision-language data (mue_fairseq/procedural)."""

import json
import os
import re
import string

import numpy as np
import pytest

from mue_fairseq.procedural.build import (VE_PROMPT, VE_PROMPT_WITH_CAPTION, BuildConfig, build, decode_image,
                                          split_rng)
from mue_fairseq.procedural.captions import MAX_CAPTION_WORDS, reference_captions
from mue_fairseq.procedural.entailment import (DECIDABLE_KINDS, LABELS, NEUTRAL_KINDS, UNOBSERVABLE_PROPERTIES,
                                               Hypothesis, evaluate, is_true, label_of, sample_hypothesis)
from mue_fairseq.procedural.scenes import COLOURS, SHAPES, Scene, relation_holds, render, sample_scene
from mue_fairseq.procedural.tokenizer import REQUIRED_SINGLE_TOKENS, train_bpe

SMALL = dict(ve_train=60, ve_valid=12, ve_test=12, ve_test_heldout=12, caption_train_images=12,
             caption_eval_images=6, refs_per_image=5, image_size=64)
VE_FILES = ["snli_ve_train", "snli_ve_dev", "snli_ve_test", "snli_ve_test_heldout"]
CAPTION_EVAL_FILES = ["caption_stage2_train", "caption_val", "caption_test", "caption_test_heldout"]


def _read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _data_files(root):
    """Every generated file except the manifest (which records timing)."""
    out = {}
    for sub in ("snli_ve", "caption", "bpe"):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            with open(os.path.join(root, sub, name), "rb") as f:
                out[f"{sub}/{name}"] = f.read()
    return out


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("proc_a"))
    manifest = build(root, BuildConfig(seed=3, **SMALL))
    return root, manifest


# ---------------------------------------------------------------- determinism and caching

def test_same_seed_gives_identical_bytes(small_build, tmp_path):
    root, _ = small_build
    build(str(tmp_path), BuildConfig(seed=3, **SMALL))
    assert _data_files(root) == _data_files(str(tmp_path))


def test_different_seed_gives_different_data(small_build, tmp_path):
    root, _ = small_build
    build(str(tmp_path), BuildConfig(seed=4, **SMALL))
    a, b = _data_files(root), _data_files(str(tmp_path))
    for name in ("snli_ve/snli_ve_train.tsv", "caption/caption_stage1_train.tsv", "caption/caption_val.tsv"):
        assert a[name] != b[name]


def test_heldout_split_is_separately_seeded(small_build):
    root, manifest = small_build
    cfg = BuildConfig(**manifest["config"])
    assert cfg.heldout_seed != cfg.seed
    assert split_rng(cfg, "snli_ve", "test_heldout").random() != split_rng(cfg, "snli_ve", "test").random()
    test = {r[2] for r in _read_tsv(os.path.join(root, "snli_ve/snli_ve_test.tsv"))}
    heldout = {r[2] for r in _read_tsv(os.path.join(root, "snli_ve/snli_ve_test_heldout.tsv"))}
    assert test != heldout
    # changing only the held-out seed changes only the held-out split
    other = BuildConfig(**{**manifest["config"], "heldout_seed": cfg.heldout_seed + 1})
    assert split_rng(other, "snli_ve", "test").random() == split_rng(cfg, "snli_ve", "test").random()
    assert split_rng(other, "snli_ve", "test_heldout").random() != split_rng(cfg, "snli_ve", "test_heldout").random()


def test_build_is_cached(small_build):
    root, _ = small_build
    assert build(root, BuildConfig(seed=3, **SMALL))["cached"] is True


def test_render_is_deterministic():
    scene = sample_scene(np.random.default_rng(0), n_objects=4)
    a, b = render(scene, 64), render(scene, 64)
    assert a.size == (64, 64) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    assert Scene.from_dict(scene.to_dict()) == scene


# ---------------------------------------------------------------- labels

def test_labels_are_checkable():
    rng = np.random.default_rng(123)
    seen_kinds = set()
    for _ in range(300):
        scene = sample_scene(rng)
        for label in LABELS:
            h = sample_hypothesis(scene, label, rng)
            seen_kinds.add(h.kind)
            assert label_of(scene, h) == label
            if label == "entailment":
                assert is_true(scene, h) and h.kind in DECIDABLE_KINDS
            elif label == "contradiction":
                assert evaluate(scene, h) is False and not is_true(scene, h)
            else:
                # neutral by construction: an undecidable predicate about a subject that is in the picture
                assert evaluate(scene, h) is None and h.kind in NEUTRAL_KINDS
                if h.kind in ("property", "hidden"):
                    assert scene.find(h.colour, h.shape) is not None
                if h.kind == "property":
                    assert h.prop in UNOBSERVABLE_PROPERTIES
            if h.kind in DECIDABLE_KINDS:
                assert evaluate(scene, h) is not None
    assert seen_kinds == set(DECIDABLE_KINDS) | set(NEUTRAL_KINDS)


def test_relations_are_never_borderline():
    rng = np.random.default_rng(7)
    for _ in range(200):
        objs = sample_scene(rng).objects
        for a in objs:
            for b in objs:
                if a is not b:
                    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
                    assert dx < 0.1 or dx > 0.25, (a, b)
                    assert dy < 0.1 or dy > 0.25, (a, b)
                    assert relation_holds(a, "left of", b) == relation_holds(b, "right of", a)


def test_tsv_metadata_matches_labels(small_build):
    root, _ = small_build
    for name in VE_FILES:
        rows = {r[0]: r for r in _read_tsv(os.path.join(root, f"snli_ve/{name}.tsv"))}
        with open(os.path.join(root, f"snli_ve/{name}_meta.json")) as f:
            meta = json.load(f)
        for s in meta["samples"]:
            row = rows[str(s["uniq_id"])]
            scene = Scene.from_dict(meta["scenes"][row[1]])
            h = Hypothesis.from_dict(s["hypothesis"])
            assert h.text == row[3] and label_of(scene, h) == row[5] == s["label"]


def test_captions_are_true_and_clean():
    rng = np.random.default_rng(5)
    noun = r"an? (?:(small|large) )?(\w+) (\w+)"
    for _ in range(200):
        scene = sample_scene(rng)
        refs = reference_captions(scene, rng, 5)
        assert len(refs) == 5
        for cap in refs:
            assert cap == cap.lower() and not set(cap) & set(string.punctuation)
            assert 1 <= len(cap.split()) <= MAX_CAPTION_WORDS
            for size, colour, shape in re.findall(noun, cap):
                if colour in COLOURS and shape in SHAPES:
                    assert scene.matching(colour=colour, shape=shape, size=size or None), cap
            for m in re.finditer(noun + r" (left of|right of|above|below) " + noun, cap):
                a, b = scene.find(m.group(2), m.group(3)), scene.find(m.group(6), m.group(7))
                assert relation_holds(a, m.group(4), b), cap


# ---------------------------------------------------------------- TSV format

def test_snli_ve_rows_parse(small_build):
    root, manifest = small_build
    for name in VE_FILES:
        rows = _read_tsv(os.path.join(root, f"snli_ve/{name}.tsv"))
        assert len(rows) == 12 or name == "snli_ve_train"
        for uniq_id, image_id, image, hyp, premise, label in rows:
            assert int(uniq_id) >= 0 and int(image_id) >= 0 and hyp and premise
            assert label in LABELS
        img = decode_image(rows[0][2])
        assert img.size == (64, 64) and img.convert("RGB").mode == "RGB"
    assert len(_read_tsv(os.path.join(root, "snli_ve/snli_ve_train.tsv"))) == 60


def test_caption_rows_parse(small_build):
    root, _ = small_build
    stage1 = _read_tsv(os.path.join(root, "caption/caption_stage1_train.tsv"))
    assert len(stage1) == 12 * 5 and all(len(r) == 5 and "&&" not in r[2] for r in stage1)
    assert len({r[0] for r in stage1}) == len(stage1)
    for name in CAPTION_EVAL_FILES:
        rows = _read_tsv(os.path.join(root, f"caption/{name}.tsv"))
        assert all(len(r) == 5 and len(r[2].split("&&")) == 5 for r in rows)
        img = decode_image(rows[0][4])
        assert img.size == (64, 64)
    for split in ("val", "test", "test_heldout"):
        rows = _read_tsv(os.path.join(root, f"caption/caption_{split}.tsv"))
        with open(os.path.join(root, f"caption/caption_{split}_gt.json")) as f:
            gt = json.load(f)
        assert {r[1] for r in rows} == {i["id"] for i in gt["images"]}
        refs = {}
        for a in gt["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        assert all(refs[r[1]] == r[2].split("&&") for r in rows)


# ---------------------------------------------------------------- tokenizer

def _all_texts(root):
    texts = []
    for name in VE_FILES:
        for r in _read_tsv(os.path.join(root, f"snli_ve/{name}.tsv")):
            texts += [VE_PROMPT.format(r[3]), VE_PROMPT_WITH_CAPTION.format(r[4], r[3])]
    for name in ["caption_stage1_train"] + CAPTION_EVAL_FILES:
        texts += [" " + r[2] for r in _read_tsv(os.path.join(root, f"caption/{name}.tsv"))]
    return texts + [" what does the image describe?"] + list(REQUIRED_SINGLE_TOKENS)


def _check_fairseq_bpe(bpe_dir, texts):
    gpt2_bpe_utils = pytest.importorskip("fairseq.data.encoders.gpt2_bpe_utils")
    from fairseq.data import Dictionary

    enc = gpt2_bpe_utils.get_encoder(os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"))
    dictionary = Dictionary.load(os.path.join(bpe_dir, "dict.txt"))
    for text in texts:
        ids = enc.encode(text)
        assert enc.decode(ids) == text
        line = dictionary.encode_line(" ".join(map(str, ids)), add_if_not_exist=False, append_eos=False)
        assert dictionary.unk() not in line.tolist()
    for answer in REQUIRED_SINGLE_TOKENS:
        assert len(enc.encode(answer)) == 1, answer
    return enc


def test_tokenizer_round_trips_with_fairseq_gpt2_bpe(small_build):
    root, manifest = small_build
    enc = _check_fairseq_bpe(os.path.join(root, "bpe"), _all_texts(root))
    assert 256 < len(enc.encoder) < 1000
    assert enc.decode(enc.encode("unseen Text, with ÜTF-8!")) == "unseen Text, with ÜTF-8!"


def test_tokenizer_adds_merges_for_required_tokens(tmp_path):
    texts = ["there is a red circle", "there are two shapes"] * 5
    summary = train_bpe(texts, str(tmp_path), vocab_size=260)
    assert summary["added_merges"] > 0
    _check_fairseq_bpe(str(tmp_path), texts)
