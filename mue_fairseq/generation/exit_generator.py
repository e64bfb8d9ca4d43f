"""A fairseq ``SequenceGenerator`` that decodes with MuE exits (greedy or beam search, batched).

Exit decisions are made per hypothesis by the decoder (each beam row exits at its own layer);
this class only switches exits on for the model, tells the decoder the N of Eq. 11 (the
generation's max length), and collects per-sample exit statistics and wall-clock time into an
:class:`~mue_fairseq.exits.accounting.ExitStats`.

Decoder statistics count every hypothesis row the search computed (all beams), since each of
them costs compute; t of Eq. 11 is the index of the token being generated (0 for the first).
"""
import time
from typing import Dict, List, Optional

import torch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from torch import Tensor

from ..exits.accounting import ExitRecord, ExitStats
from ..exits.config import ExitConfig

SAMPLE_INDEX = "sample_index"  # rides along encoder_out so beam reorders keep it aligned


def sample_ids(ids, count: int) -> List[Optional[int]]:
    """Integer sample ids of a batch for the exit records: its ``id`` (a tensor, or OFA's
    array of id strings) where numeric, else None; ``range(count)`` without ids."""
    if ids is None:
        return list(range(count))
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    out: List[Optional[int]] = []
    for v in values:
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            out.append(None)
    return out


class _TrackingEnsemble(EnsembleModel):
    """Adds each row's sample index to the encoder output, and remembers encoder exit info."""

    def __init__(self, models):
        super().__init__(models)
        self.last_encoder_out: Optional[Dict[str, List[Tensor]]] = None

    def forward_encoder(self, net_input):
        outs = super().forward_encoder(net_input)
        if outs:
            for out in outs:
                bsz = out["encoder_padding_mask"][0].size(0)
                out[SAMPLE_INDEX] = [torch.arange(bsz, device=out["encoder_padding_mask"][0].device)]
            self.last_encoder_out = outs[0]
        return outs


class ExitAwareSequenceGenerator(SequenceGenerator):
    def __init__(self, models, tgt_dict, exit_cfg: ExitConfig, **kwargs):
        if len(models) != 1:
            raise ValueError("early exiting supports a single model, not an ensemble")
        super().__init__(models, tgt_dict, **kwargs)
        self.model = _TrackingEnsemble(models)
        self.model.eval()
        self.exit_cfg = ExitConfig.from_cfg(exit_cfg)
        model = models[0]
        self.exit_cfg.validate(model.encoder.num_layers, model.decoder.num_layers)
        self.stats = ExitStats(
            num_encoder_layers=model.encoder.num_layers,
            num_decoder_layers=model.decoder.num_layers,
            embed_dim=model.decoder.embed_dim,
            ffn_dim=model.decoder.layers[0].fc1.out_features,
            decomposed_encoder=bool(model.encoder.decompose_modalities),
        )

    def _max_len(self, sample) -> int:
        src_len = sample["net_input"]["src_tokens"].size(1)
        return min(int(self.max_len_a * src_len + self.max_len_b), self.max_len - 1)

    @torch.no_grad()
    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token: Optional[int] = None):
        model = self.model.single_model
        steps: List[tuple] = []
        model.set_exit_config(self.exit_cfg, max_len=self._max_len(sample))
        model.decoder.exit_observer = lambda enc, layers: steps.append((enc[SAMPLE_INDEX][0], layers))
        start = time.perf_counter()
        try:
            hypos = super()._generate(sample, prefix_tokens, constraints, bos_token)
        finally:
            model.decoder.exit_observer = None
            model.set_exit_config(None)
        elapsed = time.perf_counter() - start
        self._record(sample, steps)
        self.stats.add_wall_clock(elapsed)
        return hypos

    def _record(self, sample, steps):
        enc = self.model.last_encoder_out
        n_layers_enc = self.stats.num_encoder_layers
        bsz = sample["net_input"]["src_tokens"].size(0)
        pad, modality = enc["encoder_padding_mask"][0], enc["modality"][0]
        image_tokens = ((modality == 1) & ~pad).sum(1).tolist()
        text_tokens = ((modality == 0) & ~pad).sum(1).tolist()
        full = [n_layers_enc] * bsz
        image_exit = enc["image_exit_layer"][0].tolist() if enc.get("image_exit_layer") else full
        text_exit = enc["text_exit_layer"][0].tolist() if enc.get("text_exit_layer") else full
        per_sample: List[List[int]] = [[] for _ in range(bsz)]
        if steps:
            rows = torch.cat([s for s, _ in steps]).tolist()
            layers = torch.cat([l for _, l in steps]).tolist()
            for row, layer in zip(rows, layers):
                per_sample[row].append(layer)
        n_dec = self.stats.num_decoder_layers
        ids = sample_ids(sample.get("id"), bsz)
        for i in range(bsz):
            self.stats.add(ExitRecord(
                image_exit_layer=image_exit[i], text_exit_layer=text_exit[i],
                image_tokens=image_tokens[i], text_tokens=text_tokens[i],
                decoder_exit_layers=per_sample[i],
                propagated_layers=[n_dec - layer for layer in per_sample[i]],
                sample_id=ids[i],
            ))
