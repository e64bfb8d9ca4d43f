"""Exit decisions: masked cosine, thresholds (Eq. 11), decoder policies."""

import math

import pytest
import torch

from mue_fairseq.exits import (
    DeeBertPolicy,
    ExitConfig,
    NoExitPolicy,
    PabeePolicy,
    SimilarityPolicy,
    StaticDepthPolicy,
    build_decoder_policy,
    encoder_stream_exits,
    masked_mean_cosine,
    threshold_at,
)


# ----------------------------------------------------------------------------- cosine


def test_masked_mean_cosine_basic_cases():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    prev = torch.stack([torch.stack([e0, e1]), torch.stack([e0, e0]), torch.stack([e0, e1])])
    curr = torch.stack(
        [torch.stack([e0 * 3, e1]), torch.stack([-e0, -2 * e0]), torch.stack([e1, e0])]
    )
    sim = masked_mean_cosine(prev, curr)  # identical dirs, opposite, orthogonal
    assert sim.shape == (3,) and sim.dtype == torch.float32
    torch.testing.assert_close(sim, torch.tensor([1.0, -1.0, 0.0]))


def test_masked_mean_cosine_padding_ignored_and_all_pad():
    prev = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    curr = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
    mask = torch.tensor([[False, True], [True, True]])
    torch.testing.assert_close(masked_mean_cosine(prev, curr, mask), torch.tensor([1.0, 1.0]))
    # without the mask the pad token counts
    torch.testing.assert_close(masked_mean_cosine(prev, curr), torch.tensor([0.0, -1.0]))


def test_masked_mean_cosine_zero_vectors_and_fp16():
    prev = torch.zeros(2, 3, 4, dtype=torch.float16)
    curr = torch.ones(2, 3, 4, dtype=torch.float16)
    curr[1] = 0
    sim = masked_mean_cosine(prev, curr)
    assert sim.dtype == torch.float32 and not torch.isnan(sim).any()
    torch.testing.assert_close(sim, torch.zeros(2))
    # tiny but nonzero vectors are not swallowed by eps
    tiny = torch.full((1, 1, 4), 1e-6)
    torch.testing.assert_close(masked_mean_cosine(tiny, tiny), torch.ones(1))
    # fp16 values whose squares would overflow in fp16
    big = torch.full((1, 2, 8), 300.0, dtype=torch.float16)
    torch.testing.assert_close(masked_mean_cosine(big, big), torch.ones(1))


def test_identical_never_exceeds_one_so_threshold_one_never_exits():
    x = torch.randn(4, 5, 16)
    assert (masked_mean_cosine(x, x.clone()) <= 1.0).all()
    assert not encoder_stream_exits(x, x.clone(), None, 1.0).any()
    assert encoder_stream_exits(x, x.clone(), None, 0.99).all()


def test_encoder_stream_exits_per_sample():
    prev = torch.randn(2, 3, 8)
    curr = prev.clone()
    curr[1] = -prev[1]
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert encoder_stream_exits(prev, curr, mask, 0.9).tolist() == [True, False]


# ----------------------------------------------------------------------------- thresholds


def test_static_threshold():
    cfg = ExitConfig(decoder_exit_threshold=0.93)
    assert threshold_at(0, 20, cfg) == 0.93 and threshold_at(19, 20, cfg) == 0.93
    t = threshold_at(torch.arange(3), 20, cfg)
    torch.testing.assert_close(t, torch.full((3,), 0.93))


def test_decaying_threshold_values():
    cfg = ExitConfig(decoder_threshold_decay=True, decay_theta=0.99, decay_beta=0.95, decay_tau=1.0)
    beta, theta = 0.95, 0.99
    assert threshold_at(0, 20, cfg) == pytest.approx(beta * theta + (1 - beta))
    assert threshold_at(20, 20, cfg) == pytest.approx(beta * theta + (1 - beta) * math.exp(-1))
    vals = threshold_at(torch.arange(21), torch.tensor(20), cfg)
    assert vals.shape == (21,)
    assert (vals[1:] < vals[:-1]).all()  # monotone decreasing
    torch.testing.assert_close(vals[5], torch.tensor(threshold_at(5, 20, cfg), dtype=torch.float32))
    assert threshold_at(0, 0, cfg) == pytest.approx(beta * theta + (1 - beta))  # N<1 -> 1


# ----------------------------------------------------------------------------- decoder policies


def _run(policy, hiddens, logits=None, step=0, max_steps=10):
    """Drive ``policy`` through layers; return each row's exit layer (num_layers if never)."""
    num_layers, rows = len(hiddens) - 1, hiddens[0].size(0)
    state = policy.start(rows, None)
    exit_layer = torch.full((rows,), num_layers)
    done = torch.zeros(rows, dtype=torch.bool)
    for layer in range(1, num_layers + 1):
        lg = None if logits is None else logits[layer - 1]
        ex = policy.decide(layer, hiddens[layer - 1], hiddens[layer], lg, state, step, max_steps)
        new = ex & ~done
        exit_layer[new] = layer
        done |= ex
    return exit_layer.tolist()


def test_similarity_policy_exits_where_cosine_exceeds_threshold():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # row 0 saturates after layer 2, row 1 after layer 4, row 2 never
    h = [torch.stack([e0, e0, e0])]
    h.append(torch.stack([e1, e1, e1]))                  # layer 1: cos 0 for all
    h.append(torch.stack([e1, e0, e0]))                  # layer 2: row 0 cos 1
    h.append(torch.stack([e1, e1, e1]))
    h.append(torch.stack([e1, e1, e0]))                  # layer 4: row 1 cos 1
    h.append(torch.stack([e1, e0, e1]))
    cfg = ExitConfig(decoder_exit_policy="similarity", decoder_exit_threshold=0.95)
    assert _run(SimilarityPolicy(cfg), h) == [2, 4, 5]
    # threshold 1.0 never exits
    cfg1 = ExitConfig(decoder_exit_policy="similarity", decoder_exit_threshold=1.0)
    assert _run(SimilarityPolicy(cfg1), h) == [5, 5, 5]


def test_similarity_policy_uses_decayed_threshold_per_step():
    prev = torch.tensor([[1.0, 0.0]])
    cos = 0.975
    curr = torch.tensor([[cos, math.sqrt(1 - cos**2)]])
    cfg = ExitConfig(decoder_exit_policy="similarity", decoder_threshold_decay=True,
                     decay_theta=0.95, decay_beta=0.5, decay_tau=1.0)
    pol = SimilarityPolicy(cfg)
    # Theta(0) = 0.975 + 0.5 = 1.475 -> no exit; Theta(N) = 0.475 + 0.5/e ~ 0.659 -> exit
    assert not pol.decide(1, prev, curr, None, None, 0, 10).item()
    assert pol.decide(1, prev, curr, None, None, 10, 10).item()
    steps = torch.tensor([0, 10])
    out = pol.decide(1, prev.expand(2, 2), curr.expand(2, 2), None, None, steps, 10)
    assert out.tolist() == [False, True]


def test_deebert_peaked_vs_flat():
    vocab, layers = 50, 4
    flat = torch.zeros(vocab)
    peaked = torch.full((vocab,), -30.0)
    peaked[7] = 10.0
    # row 0 peaked from layer 2, row 1 always flat, row 2 peaked at layer 3
    logits = [torch.stack([flat, flat, flat]), torch.stack([peaked, flat, flat]),
              torch.stack([peaked, flat, peaked]), torch.stack([flat, flat, flat])]
    h = [torch.randn(3, 8) for _ in range(layers + 1)]
    pol = DeeBertPolicy(threshold=0.5)
    assert pol.needs_logits
    assert _run(pol, h, logits) == [2, 4, 3]
    # -inf masked entries do not produce NaN; ln(2) entropy for two equal live tokens
    lg = torch.full((1, vocab), -math.inf)
    lg[0, :2] = 0.0
    assert not pol.decide(1, h[0][:1], h[1][:1], lg, None, 0, 1).item()  # ln 2 > 0.5
    assert DeeBertPolicy(0.7).decide(1, h[0][:1], h[1][:1], lg, None, 0, 1).item()
    with pytest.raises(ValueError):
        pol.decide(1, h[0], h[1], None, None, 0, 1)


def _onehot_logits(argmaxes, vocab=10):
    """argmaxes: list over layers of per-row argmax -> list of (rows, vocab) logits."""
    out = []
    for per_row in argmaxes:
        lg = torch.zeros(len(per_row), vocab)
        lg[torch.arange(len(per_row)), torch.tensor(per_row)] = 5.0
        out.append(lg)
    return out


def test_pabee_patience_two():
    # row 0: a b b b c c -> counter 0 0 1 2 -> exits at layer 4
    # row 1: a a a ...   -> counter 0 1 2 -> exits at layer 3
    # row 2: a b a b a b -> never -> 6
    seq = [[1, 1, 1], [2, 1, 2], [2, 1, 1], [2, 3, 2], [3, 3, 1], [3, 3, 2]]
    h = [torch.randn(3, 4) for _ in range(7)]
    pol = PabeePolicy(2)
    assert pol.needs_logits
    assert _run(pol, h, _onehot_logits(seq)) == [4, 3, 6]
    assert _run(PabeePolicy(1), h, _onehot_logits(seq)) == [3, 2, 6]


def test_pabee_state_select_after_compaction():
    pol = PabeePolicy(2)
    h = torch.randn(3, 4)
    state = pol.start(3, torch.device("cpu"))
    # layer 1: argmax 1, 2, 3; layer 2: rows repeat -> counters 1, 1, 1
    for layer, am in ((1, [1, 2, 3]), (2, [1, 2, 3])):
        pol.decide(layer, h, h, _onehot_logits([am])[0], state, 0, 5)
    assert state.counter.tolist() == [1, 1, 1]
    # compact: keep rows 0 and 2 (row 1 exited elsewhere)
    state = pol.select(state, torch.tensor([0, 2]))
    assert state.prev_argmax.tolist() == [1, 3] and state.counter.tolist() == [1, 1]
    ex = pol.decide(3, h[:2], h[:2], _onehot_logits([[1, 4]])[0], state, 0, 5)
    assert ex.tolist() == [True, False]
    assert state.counter.tolist() == [2, 0] and state.prev_argmax.tolist() == [1, 4]
    # bool masks work too
    state = pol.select(state, torch.tensor([False, True]))
    assert state.prev_argmax.tolist() == [4]


def test_static_and_none():
    h = [torch.randn(2, 4) for _ in range(7)]
    assert _run(StaticDepthPolicy(3), h) == [3, 3]
    assert _run(NoExitPolicy(), h) == [6, 6]


@pytest.mark.parametrize(
    "kwargs, cls",
    [
        ({}, NoExitPolicy),
        ({"decoder_exit_policy": "similarity"}, SimilarityPolicy),
        ({"decoder_exit_policy": "deebert", "deebert_entropy_threshold": 0.3}, DeeBertPolicy),
        ({"decoder_exit_policy": "pabee", "pabee_patience": 3}, PabeePolicy),
        ({"decoder_exit_policy": "static", "static_exit_layer": 4}, StaticDepthPolicy),
    ],
)
def test_build_decoder_policy(kwargs, cls):
    pol = build_decoder_policy(ExitConfig(**kwargs), num_layers=6)
    assert type(pol) is cls


def test_build_decoder_policy_validates_depth():
    with pytest.raises(ValueError, match="--static-exit-layer"):
        build_decoder_policy(ExitConfig(decoder_exit_policy="static", static_exit_layer=7), 6)
