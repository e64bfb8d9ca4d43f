"""The OFA model against the original implementation: state-dict names/shapes per arch,
logits on stored reference outputs, incremental = full decoding, clear errors on bad input."""
import json
import os

import pytest
import torch

from mue_fairseq.testing import deterministic_fill_
from ofa_helpers import TINY_RELEASED, build_ofa, dictionary_of, tiny_dictionary

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PARITY = torch.load(os.path.join(FIXTURES, "ofa_parity.pt"), weights_only=True)


@pytest.mark.parametrize("arch", ["ofa_tiny", "ofa_medium", "ofa_base", "ofa_large", "ofa_huge"])
def test_state_dict_names_and_shapes_equal_original(arch):
    ref = json.load(open(os.path.join(FIXTURES, f"ofa_{arch.split('_')[1]}.json")))
    args = {flag: True for flag in ref["released_flags"]}
    args["patch_image_size"] = ref["patch_image_size"]
    with torch.device("meta"):
        model = build_ofa(args, tiny_dictionary(ref["dictionary_size"] - 4), arch=arch)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref["state_dict"]


def _model_and_inputs(name):
    fx = PARITY[name]
    model = build_ofa(fx["args"], dictionary_of(fx["dictionary_symbols"][4:]))
    deterministic_fill_(model, fx["seed"]).eval()
    inputs = dict(fx["inputs"])
    inputs["patch_images"] = inputs["patch_images"].float()
    return model, inputs, fx["outputs"]


@pytest.mark.parametrize("name", sorted(PARITY))
def test_logits_equal_original(name):
    model, inputs, ref = _model_and_inputs(name)
    with torch.no_grad():
        logits, extra = model(**inputs)
        encoder_out = model.encoder(inputs["src_tokens"], inputs["src_lengths"],
                                    patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"])
    assert logits.shape == ref["logits"].shape
    torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=0)
    for ours, theirs in zip(extra["inner_states"], ref["decoder_inner_states"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(extra["attn"][0], ref["decoder_attn"], atol=1e-5, rtol=0)
    enc_ref = ref["encoder_out"]
    torch.testing.assert_close(encoder_out["encoder_out"][0], enc_ref["encoder_out"][0], atol=1e-5, rtol=0)
    assert torch.equal(encoder_out["encoder_padding_mask"][0], enc_ref["encoder_padding_mask"][0])
    torch.testing.assert_close(encoder_out["position_embeddings"][0], enc_ref["position_embeddings"][0],
                               atol=1e-5, rtol=0)


def test_train_mode_batch_norm_equals_original():
    torch.set_num_threads(1)  # batch statistics: same reduction order as the reference run
    model, inputs, ref = _model_and_inputs("tiny_released")
    model.train()
    with torch.no_grad():
        logits, _ = model(**inputs)
    torch.testing.assert_close(logits, ref["train_logits"], atol=1e-5, rtol=0)
    bn = model.encoder.embed_images.bn1
    torch.testing.assert_close(bn.running_mean, ref["train_bn1_running_mean_after"], atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, ref["train_bn1_running_var_after"], atol=1e-6, rtol=0)


def _decode_incrementally(model, inputs):
    enc = model.encoder(inputs["src_tokens"], inputs["src_lengths"],
                        patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"])
    state, steps = {}, []
    tokens = inputs["prev_output_tokens"]
    for t in range(1, tokens.size(1) + 1):
        out, _ = model.decoder(tokens[:, :t], encoder_out=enc, incremental_state=state)
        steps.append(out)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_incremental_decoding_equals_full_and_original(name):
    model, inputs, ref = _model_and_inputs(name)
    with torch.no_grad():
        full, _ = model(**inputs)
        incremental = _decode_incrementally(model, inputs)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(incremental, ref["incremental_logits"], atol=1e-5, rtol=0)


def test_beam_reorder_of_incremental_state():
    """As in beam search: the rows are beams of one sentence, reordered between steps."""
    model, inputs, _ = _model_and_inputs("tiny_released")
    order = torch.tensor([2, 0, 0])
    tokens = inputs["prev_output_tokens"][:, :4]
    with torch.no_grad():
        enc = model.encoder(inputs["src_tokens"], inputs["src_lengths"], patch_images=inputs["patch_images"],
                            patch_masks=inputs["patch_masks"])
        beams = model.encoder.reorder_encoder_out(enc, torch.tensor([0, 0, 0]))
        state = {}
        for t in range(1, 3):
            model.decoder(tokens[:, :t], encoder_out=beams, incremental_state=state)
        model.decoder.reorder_incremental_state_scripting(state, order)
        stepped, _ = model.decoder(tokens[order, :3], encoder_out=beams, incremental_state=state)
        full, _ = model.decoder(tokens[order, :3], encoder_out=beams)
    torch.testing.assert_close(stepped[:, -1], full[:, -1], atol=1e-5, rtol=0)


def _tiny():
    model = build_ofa(dict(TINY_RELEASED))
    return deterministic_fill_(model, 0).eval()


def test_error_on_image_too_large_for_position_table():
    model = _tiny()
    tokens = torch.tensor([[5, 6, 2]])
    with pytest.raises(ValueError, match="patch-image-size <= 672"):
        model.encoder(tokens, torch.tensor([3]), patch_images=torch.zeros(1, 3, 688, 688),
                      patch_masks=torch.tensor([True]))


def test_error_on_patch_masks_batch_mismatch():
    model = _tiny()
    tokens = torch.tensor([[5, 6, 2], [7, 2, 1]])
    with pytest.raises(ValueError, match="patch_masks"):
        model.encoder(tokens, torch.tensor([3, 2]), patch_images=torch.zeros(2, 3, 32, 32),
                      patch_masks=torch.tensor([True]))
    with pytest.raises(ValueError, match="batch size 1"):
        model.encoder(tokens, torch.tensor([3, 2]), patch_images=torch.zeros(1, 3, 32, 32))


def test_error_on_token_ids_outside_dictionary():
    model = _tiny()
    with pytest.raises(ValueError, match="id 104, outside the dictionary of 104"):
        model.encoder(torch.tensor([[5, 104, 2]]), torch.tensor([3]))
    enc = model.encoder(torch.tensor([[5, 6, 2]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="outside the dictionary"):
        model.decoder(torch.tensor([[0, -1]]), encoder_out=enc)


def test_unsupported_ofa_option_is_refused():
    with pytest.raises(NotImplementedError, match="--scale-resids"):
        build_ofa({**TINY_RELEASED, "scale_resids": True})


def test_frozen_resnet_uses_fixed_statistics():
    model = build_ofa({**TINY_RELEASED, "freeze_resnet": True})
    assert "encoder.embed_images.bn1.num_batches_tracked" not in model.state_dict()
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bn" in n)
    model.train()
    images = torch.randn(2, 3, 32, 32)
    before = model.encoder.embed_images.bn1.running_mean.clone()
    model.encoder(torch.tensor([[5, 2], [6, 2]]), torch.tensor([2, 2]), patch_images=images)
    assert torch.equal(before, model.encoder.embed_images.bn1.running_mean)
