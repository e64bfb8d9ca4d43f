"""Exit accounting: ETR (Eq. 14), compute-weighted reduction, summary, JSON, merge."""

import json

import pytest
import torch

from mue_fairseq.exits import ExitRecord, ExitStats


def _stats(**kw):
    return ExitStats(num_encoder_layers=6, num_decoder_layers=6, embed_dim=8, ffn_dim=16, **kw)


def test_etr_single_sample_by_hand():
    s = _stats()
    s.add(ExitRecord(image_exit_layer=3, text_exit_layer=5, image_tokens=10, text_tokens=4,
                     decoder_exit_layers=[2, 4, 6]))
    assert s.expected_time_reduction() == pytest.approx(1 - (4 / 6 + 12 / 18) / 2)


def test_etr_aggregate_averages_encoder_pools_decoder_tokens():
    s = _stats()
    s.add(ExitRecord(3, 5, 10, 4, [2, 4, 6]))   # n_E = 4
    s.add(ExitRecord(6, 6, 10, 4, [6]))         # n_E = 6
    enc = (4 / 6 + 6 / 6) / 2
    dec = (2 + 4 + 6 + 6) / (4 * 6)             # pooled over 4 tokens, not per-sample mean
    assert s.expected_time_reduction() == pytest.approx(1 - (enc + dec) / 2)


def test_etr_no_exit_is_zero_and_empty_is_none():
    s = _stats()
    assert s.expected_time_reduction() is None and s.compute_weighted_reduction() is None
    s.add(ExitRecord(6, 6, 3, 3, [6, 6]))
    assert s.expected_time_reduction() == 0.0
    assert s.compute_weighted_reduction() == 0.0


def test_compute_weighted_reduction_by_hand():
    # d=2, f=4: c_enc(L) = 4*4 + 2*2*4 + 2*2*L = 32 + 4L; c_dec = 6*4 + 2*2*4 = 40; c_kv = 8
    s = ExitStats(num_encoder_layers=2, num_decoder_layers=2, embed_dim=2, ffn_dim=4)
    s.add(ExitRecord(image_exit_layer=1, text_exit_layer=2, image_tokens=3, text_tokens=2,
                     decoder_exit_layers=[1, 2], propagated_layers=[1, 0]))
    assert s.layer_costs(3) == {"enc": 44, "dec": 40, "kv": 8}
    actual = 3 * 1 * 44 + 2 * 2 * 40 + (1 + 2) * 40 + 1 * 8      # = 420
    full = 3 * 2 * 44 + 2 * 2 * 40 + 2 * 2 * 40                   # = 584
    assert s.sample_costs(s.records[0]) == {"actual": actual, "full": full}
    assert s.compute_weighted_reduction() == pytest.approx(1 - 420 / 584)

    # joint (non-decomposed) encoder: both streams attend over 5 tokens, c_enc = 52
    j = ExitStats(2, 2, 2, 4, decomposed_encoder=False)
    j.add(s.records[0])
    actual = 3 * 1 * 52 + 2 * 2 * 52 + 128
    full = 3 * 2 * 52 + 2 * 2 * 52 + 160
    assert j.compute_weighted_reduction() == pytest.approx(1 - actual / full)


def test_add_rejects_out_of_range():
    s = _stats()
    with pytest.raises(ValueError):
        s.add(ExitRecord(0, 6, 1, 1, [6]))
    with pytest.raises(ValueError):
        s.add(ExitRecord(6, 7, 1, 1, [6]))
    with pytest.raises(ValueError):
        s.add(ExitRecord(6, 6, 1, 1, [7]))
    with pytest.raises(ValueError):
        s.add(ExitRecord(6, 6, 1, 1, [2], propagated_layers=[5]))
    with pytest.raises(ValueError):
        s.add(ExitRecord(6, 6, 1, 1, [2, 3], propagated_layers=[4]))


def test_add_batch_from_tensors_and_summary():
    s = _stats()
    s.add_batch(
        image_exit_layers=torch.tensor([3, 6]),
        text_exit_layers=torch.tensor([5, 2]),
        image_tokens=torch.tensor([10, 10]),
        text_tokens=[4, 3],
        decoder_exit_layers=[torch.tensor([2, 4, 6]), [1]],
        propagated_layers=[[4, 2, 0], [5]],
        sample_ids=torch.tensor([11, 12]),
    )
    s.add_wall_clock(1.5)
    sm = s.summary()
    assert sm["num_samples"] == 2 and sm["num_tokens"] == 4
    assert sm["mean_image_exit_layer"] == 4.5 and sm["mean_text_exit_layer"] == 3.5
    assert sm["mean_decoder_exit_layer"] == pytest.approx(13 / 4)
    assert sm["mean_propagated_layers"] == pytest.approx(11 / 4)
    assert sm["image_exit_histogram"] == [0, 0, 1, 0, 0, 1]
    assert sm["text_exit_histogram"] == [0, 1, 0, 0, 1, 0]
    assert sm["decoder_exit_histogram"] == [1, 1, 0, 1, 0, 1]
    assert sm["wall_clock_seconds"] == 1.5
    assert s.records[0].sample_id == 11 and s.records[1].decoder_exit_layers == [1]
    text = s.format_summary()
    assert "expected time reduction" in text and "compute-weighted" in text
    assert len(text.splitlines()) == 4


def test_json_round_trip(tmp_path):
    s = _stats(decomposed_encoder=False)
    s.add(ExitRecord(3, 3, 10, 4, [2, 4, 6], [4, 2, 0], sample_id=7))
    s.add(ExitRecord(6, 6, 9, 5, [], []))
    s.add_wall_clock(2.25)
    path = tmp_path / "exit-stats.json"
    s.to_json(str(path))
    raw = json.loads(path.read_text())  # plain JSON
    assert raw["summary"]["num_samples"] == 2 and len(raw["records"]) == 2
    back = ExitStats.from_json(str(path))
    assert back.records == s.records
    assert back.summary() == s.summary()
    assert back.decomposed_encoder is False and back.wall_clock_seconds == 2.25


def test_merge():
    a, b = _stats(), _stats()
    a.add(ExitRecord(3, 5, 10, 4, [2, 4, 6]))
    b.add(ExitRecord(6, 6, 10, 4, [6]))
    a.add_wall_clock(1.0)
    b.add_wall_clock(2.0)
    both = _stats()
    for r in a.records + b.records:
        both.add(r)
    a.merge(b)
    assert a.expected_time_reduction() == pytest.approx(both.expected_time_reduction())
    assert a.wall_clock_seconds == 3.0 and len(a.records) == 2
    with pytest.raises(ValueError):
        a.merge(ExitStats(6, 12, 8, 16))
