"""MuE inference: modality decomposition, per-modality encoder exits, per-token decoder exits
with state propagation, the exit-aware generator, and option validation."""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from mue_fairseq.exits.config import ExitConfig
from mue_fairseq.exits.policies import DecoderExitPolicy, masked_mean_cosine
from mue_fairseq.generation import ExitAwareSequenceGenerator
from mue_fairseq.testing import deterministic_fill_
from ofa_helpers import TINY_RELEASED, build_ofa, tiny_dictionary

DICT = tiny_dictionary()
GEN = dict(beam_size=3, max_len_b=8, min_len=1)


def _model(decompose=True, seed=3, layers=3):
    args = {**TINY_RELEASED, "decompose_modalities": decompose, "encoder_layers": layers, "decoder_layers": layers}
    return deterministic_fill_(build_ofa(args, DICT), seed).eval()


def _sample(bsz=3, seed=0, no_image_row=None):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 104, (bsz, 6), generator=g)
    src[:, -1] = 2
    src[-1, 3:] = 1
    src[-1, 2] = 2
    masks = torch.ones(bsz, dtype=torch.bool)
    if no_image_row is not None:
        masks[no_image_row] = False
    return {"id": torch.arange(bsz), "net_input": {
        "src_tokens": src, "src_lengths": src.ne(1).sum(1),
        "patch_images": torch.randn(bsz, 3, 64, 64, generator=g), "patch_masks": masks}}


def _encode(model, sample):
    return model.encoder(**sample["net_input"])


# ---------------------------------------------------------------- decomposition
def test_decomposed_text_stream_equals_text_only_encoder():
    model, sample = _model(), _sample()
    net = sample["net_input"]
    with torch.no_grad():
        joint_text_only = model.encoder(net["src_tokens"], net["src_lengths"])
        decomposed = model.encoder(**net)
    n_img = decomposed["encoder_out"][0].size(0) - net["src_tokens"].size(1)
    text_rows = ~net["src_tokens"].eq(1)
    ours = decomposed["encoder_out"][0][n_img:].transpose(0, 1)[text_rows]
    theirs = joint_text_only["encoder_out"][0].transpose(0, 1)[text_rows]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(decomposed["encoder_padding_mask"][0][:, n_img:], net["src_tokens"].eq(1))
    assert torch.equal(decomposed["modality"][0][:, :n_img], torch.ones_like(decomposed["modality"][0][:, :n_img]))


def test_decomposed_streams_do_not_see_each_other():
    model, sample = _model(), _sample()
    other = _sample(seed=1)
    net = dict(sample["net_input"], src_tokens=other["net_input"]["src_tokens"])
    with torch.no_grad():
        a = model.encoder(**sample["net_input"])["encoder_out"][0]
        b = model.encoder(**net)["encoder_out"][0]
        joint = _model(decompose=False)
        c = joint.encoder(**sample["net_input"])["encoder_out"][0]
        d = joint.encoder(**net)["encoder_out"][0]
    n_img = a.size(0) - 6
    assert torch.equal(a[:n_img], b[:n_img])  # image stream ignores the text
    assert not torch.allclose(c[:n_img], d[:n_img])  # the joint encoder does not


def test_decomposition_off_is_the_plain_model():
    plain, decomposed_off = _model(decompose=False), _model(decompose=False)
    sample = _sample()
    prev = torch.tensor([[0, 5, 6], [0, 7, 8], [0, 9, 1]])
    with torch.no_grad():
        a, _ = plain(**sample["net_input"], prev_output_tokens=prev)
        decomposed_off.set_exit_config(ExitConfig())  # all exits off
        b, _ = decomposed_off(**sample["net_input"], prev_output_tokens=prev)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- encoder exits
def _stream_similarities(model, sample):
    """Per-layer similarities of every sample in each stream at full depth."""
    seen = {}
    model.encoder.similarity_observer = lambda name, layer, rows, sim: seen.setdefault(name, {}).update(
        {layer: dict(zip(rows.tolist(), sim.tolist()))})
    model.encoder.exit_thresholds = (1.0, 1.0)
    with torch.no_grad():
        out = _encode(model, sample)
    model.encoder.similarity_observer, model.encoder.exit_thresholds = None, None
    assert out["image_exit_layer"][0].tolist() == [3, 3, 3]
    return seen


@pytest.mark.parametrize("stream", ["image", "text"])
def test_encoder_exits_at_the_layer_the_rule_says(stream):
    model, sample = _model(), _sample()
    sims = _stream_similarities(model, sample)[stream]
    layers = sorted(sims)
    values = sorted({v for layer in layers[:-1] for v in sims[layer].values()})
    threshold = (values[len(values) // 2] + values[len(values) // 2 + 1]) / 2  # between two observed values
    expected = []
    for row in range(3):
        exit_at = next((l for l in layers[:-1] if sims[l][row] > threshold), layers[-1])
        expected.append(exit_at)
    assert len(set(expected)) > 1 or expected[0] < layers[-1]  # the constructed case exits somewhere
    model.encoder.exit_thresholds = (threshold, 1.0) if stream == "image" else (1.0, threshold)
    with torch.no_grad():
        out = _encode(model, sample)
    assert out[f"{stream}_exit_layer"][0].tolist() == expected


def test_exited_stream_takes_its_exit_layer_output_through_final_norm():
    model, sample = _model(), _sample()
    model.encoder.exit_thresholds = (-1.0, -1.0)  # every stream exits after layer 1
    with torch.no_grad():
        out = _encode(model, sample)
        one_layer = _model()
        one_layer.encoder.layers = one_layer.encoder.layers[:1]
        one_layer.encoder.num_layers = 1
        ref = one_layer.encoder(**sample["net_input"])
    assert out["image_exit_layer"][0].tolist() == [1, 1, 1] and out["text_exit_layer"][0].tolist() == [1, 1, 1]
    keep = ~out["encoder_padding_mask"][0].t()
    torch.testing.assert_close(out["encoder_out"][0][keep], ref["encoder_out"][0][keep], atol=1e-5, rtol=0)


def test_sample_without_image_skips_the_image_stream_and_gives_no_nan():
    model, sample = _model(), _sample(no_image_row=1)
    model.encoder.exit_thresholds = (0.9, 0.95)
    with torch.no_grad():
        out = _encode(model, sample)
    assert out["image_exit_layer"][0][1].item() == 0
    assert torch.isfinite(out["encoder_out"][0]).all()


def test_masked_mean_cosine_of_zero_vectors_is_finite():
    zeros = torch.zeros(2, 3, 4)
    assert torch.isfinite(masked_mean_cosine(zeros, zeros, torch.tensor([[False] * 3, [True] * 3]))).all()


# ---------------------------------------------------------------- decoder exits
class _RecordingPolicy(DecoderExitPolicy):
    """Exits each row at a fixed per-row layer; records (layer, step, max_steps)."""
    needs_logits = False

    def __init__(self, plan):
        self.plan, self.calls = plan, []

    def start(self, num_rows, device=None):
        return torch.arange(num_rows)

    def select(self, state, row_index):
        return state[row_index]

    def decide(self, layer, hidden_in, hidden_out, logits, state, step, max_steps):
        self.calls.append((layer, step, max_steps))
        return torch.tensor([self.plan(step, int(row)) == layer for row in state])


def _slow_reference(model, enc, tokens, exit_layers):
    """Recompute every position from scratch with the same exits and state propagation:
    position p's input to layer j is its own hidden state while j <= exit[p], else its
    exited state; its output is read at its exit layer."""
    dec = model.decoder
    tgt_len = tokens.size(1)
    self_bias, cross_bias, raw = dec._position_biases(tgt_len, enc["position_embeddings"][0], last_only=False)
    x = dec.embed(tokens, raw)
    causal = dec._future_mask(tgt_len, x)
    exited = x.clone()
    for j, layer in enumerate(dec.layers, start=1):
        out, _ = layer(x, enc["encoder_out"][0], enc["encoder_padding_mask"][0],
                       self_attn_bias=self_bias + dec._rel_bias(j - 1, tgt_len, False),
                       cross_attn_bias=cross_bias, self_attn_mask=causal)
        running = (exit_layers >= j).t()[:, :, None]  # (tgt_len, batch, 1)
        x = torch.where(running, out, exited)
        exited = torch.where((exit_layers == j).t()[:, :, None], out, exited)
    return dec.project(exited.transpose(0, 1))


def test_state_propagation_equals_slow_reference():
    model, sample = _model(), _sample()
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 9, 8, 7, 6, 5], [0, 11, 12, 13, 14, 15]])
    plan = lambda step, row: 1 + (step * 7 + row * 3) % 3  # varied exits per token and row
    policy = _RecordingPolicy(plan)
    seen = []
    with torch.no_grad():
        enc = _encode(model, sample)
        model.decoder.exit_policy, model.decoder.exit_max_len = policy, 99
        model.decoder.exit_observer = lambda e, layers: seen.append(layers)
        state, fast = {}, []
        for t in range(1, tokens.size(1) + 1):
            out, _ = model.decoder(tokens[:, :t], encoder_out=enc, incremental_state=state)
            fast.append(out)
        model.decoder.exit_policy = model.decoder.exit_observer = None
        fast = torch.cat(fast, dim=1)
        exit_layers = torch.stack(seen, dim=1)  # (batch, tgt_len)
        expected = torch.tensor([[plan(s, r) for s in range(6)] for r in range(3)])
        assert torch.equal(exit_layers, expected)
        slow = _slow_reference(model, enc, tokens, exit_layers)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert {(step, n) for _, step, n in policy.calls} >= {(0, 99), (5, 99)}  # t and N of Eq. 11


def _generate(model, sample, cfg=None, **kw):
    kw = {**GEN, **kw}
    if cfg is None:
        return SequenceGenerator([model], DICT, **kw).generate([model], sample, bos_token=0), None
    gen = ExitAwareSequenceGenerator([model], DICT, exit_cfg=cfg, **kw)
    return gen.generate([model], sample, bos_token=0), gen.stats


@pytest.mark.parametrize("beam", [1, 3])
def test_thresholds_of_one_equal_the_stock_generator(beam):
    model, sample = _model(), _sample(no_image_row=2)
    cfg = ExitConfig(encoder_exit=True, image_exit_threshold=1.0, text_exit_threshold=1.0,
                     decoder_exit_policy="similarity", decoder_exit_threshold=1.0)
    stock, _ = _generate(model, sample, beam_size=beam)
    ours, stats = _generate(model, sample, cfg, beam_size=beam)
    for a, b in zip(stock, ours):
        for ha, hb in zip(a, b):
            assert torch.equal(ha["tokens"], hb["tokens"])
            assert ha["score"] == hb["score"]
    assert stats.expected_time_reduction() == 0.0


MUE = ExitConfig(encoder_exit=True, image_exit_threshold=0.5, text_exit_threshold=0.6,
                 decoder_exit_policy="similarity", decoder_exit_threshold=0.6)


def test_exits_save_layers_and_accounting_is_consistent():
    model, sample = _model(), _sample()
    _, stats = _generate(model, sample, MUE)
    summary = stats.summary()
    assert 0 < stats.expected_time_reduction() < 1
    assert 0 < stats.compute_weighted_reduction() < 1
    for r in stats.records:
        assert all(p == 3 - k for p, k in zip(r.propagated_layers, r.decoder_exit_layers))
    assert summary["num_samples"] == 3 if "num_samples" in summary else True


def test_batched_generation_equals_one_by_one():
    model, sample = _model(), _sample()
    batched, stats = _generate(model, sample, MUE)
    for i in range(3):
        single = {"id": sample["id"][i:i + 1],
                  "net_input": {k: v[i:i + 1] for k, v in sample["net_input"].items()}}
        if i == 2:  # drop the padding column the batch needed
            width = int(single["net_input"]["src_lengths"][0])
            single["net_input"]["src_tokens"] = single["net_input"]["src_tokens"][:, :width]
        alone, alone_stats = _generate(model, single, MUE)
        for ha, hb in zip(batched[i], alone[0]):
            assert torch.equal(ha["tokens"], hb["tokens"])
            torch.testing.assert_close(ha["score"], hb["score"], atol=1e-4, rtol=0)
        rec, rec_alone = stats.records[i], alone_stats.records[0]
        assert (rec.image_exit_layer, rec.text_exit_layer) == (rec_alone.image_exit_layer, rec_alone.text_exit_layer)


@pytest.mark.parametrize("policy", ["deebert", "pabee", "static"])
def test_baseline_policies_run_in_the_generator(policy):
    model, sample = _model(), _sample()
    cfg = ExitConfig(decoder_exit_policy=policy, static_exit_layer=2 if policy == "static" else 0,
                     deebert_entropy_threshold=4.7, pabee_patience=1)
    _, stats = _generate(model, sample, cfg)
    layers = [k for r in stats.records for k in r.decoder_exit_layers]
    assert layers and all(1 <= k <= 3 for k in layers)
    if policy == "static":
        assert set(layers) == {2}


@pytest.mark.parametrize("field,value,option", [
    ("image_exit_threshold", 1.5, "--image-exit-threshold"),
    ("text_exit_threshold", float("nan"), "--text-exit-threshold"),
    ("decay_beta", 1.2, "--decay-beta"),
    ("decay_tau", 0.0, "--decay-tau"),
    ("pabee_patience", 0, "--pabee-patience"),
])
def test_invalid_options_are_refused_at_start_up(field, value, option):
    model = _model()
    cfg = ExitConfig(encoder_exit=True, decoder_exit_policy="pabee" if field == "pabee_patience" else "similarity",
                     **{field: value})
    with pytest.raises(ValueError, match=option):
        ExitAwareSequenceGenerator([model], DICT, exit_cfg=cfg, **GEN)


def test_static_depth_outside_the_decoder_is_refused():
    with pytest.raises(ValueError, match="--static-exit-layer"):
        ExitAwareSequenceGenerator([_model()], DICT, exit_cfg=ExitConfig(decoder_exit_policy="static",
                                                                          static_exit_layer=4), **GEN)


def test_encoder_exit_needs_decomposition():
    with pytest.raises(ValueError, match="--decompose-modalities"):
        _model(decompose=False).set_exit_config(ExitConfig(encoder_exit=True))
