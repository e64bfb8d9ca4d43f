"""Wall-clock benchmark of MuE early exiting (encoder and decoder measured separately).

    python benchmarks/bench_exits.py [--quick] [--out results.json]

``--quick`` (under a minute): ofa_tiny only, shorter time budget. Without it: ofa_tiny and
ofa_base (about 5 minutes on a 2-core machine). Both print two Markdown tables to stdout
(progress goes to stderr) and, with ``--out``, write every figure (per-run times on both
clocks, thresholds, exit histograms, per-layer times, calibration similarities) as JSON.
``--help`` lists the knobs (archs, batch sizes, image size, steps, beam, time budget, threads).

Models are built from the arch presets with OFA's released flags (NormFormer scaling, shared
embeddings, ``--decompose-modalities``) and random weights (``deterministic_fill_``), so the
exit thresholds are *calibrated* to hit a depth, not the paper's values: random weights give
their own similarity distribution (and one that hardly differs between samples, so nearly all
samples of a batch exit at the same layer).

What is timed (torch.no_grad, eval mode, ``--threads`` intra-op threads, default 1: on a shared
2-core machine one thread is both faster and far less noisy than two)
-----------------------------------------------------------------------------------------
Encoder: ``model.encoder(src_tokens, src_lengths, patch_images=, patch_masks=)`` on B samples
(image ``--image-size`` px = (px/16)^2 patches, text of up to ``--text-len`` tokens,
right-padded). The ResNet patch embedding does not depend on exiting: it is computed once per
image and served from a cache (``encoder.embed_image`` is swapped for a lookup), so the timed
part is the text embedding, position biases and both streams (image, text) through the layers.
At B = 1 each of the first ``--b1-samples`` samples runs on its own and the times are summed.

Decoder: incremental steps ``model.decoder(tokens[:, :t], encoder_out=..., incremental_state=...)``
over a fixed random token sequence, B x ``--beam`` rows (the encoder output expanded per beam
row, as beam search does). The BOS step runs once per batch, at full depth, and every timed
decode starts from a copy of the state after it: that step fills every layer's cross-attention
key/value cache from the encoder output, a one-off cost that exiting does not change. Steps
1..``--steps`` are timed (incl. the output projection). With an exit policy the propagation of
exited rows' states (k/v projections of the layers they skip) is done, and timed, as in real
generation.

Settings: ``full`` (no exit code: ``exit_thresholds``/``exit_policy`` None), ``never``
(thresholds 1.0: every similarity is computed, nothing exits) and MuE at thresholds chosen so
that the mean exit layer is about 75 %, 50 % and 25 % of the depth. Calibration: one run with
thresholds 1.0 and the similarity observer records every (sample or row, layer) similarity; the
exit layer for a threshold t is the first layer < N whose similarity is > t (else N), and t is
the midpoint between observed values that brings the mean exit layer (image and text stream
separately; decoder over all timed tokens) closest to the target. The exit layers reported are
those of the real runs (decoder: they can differ a little from the calibration, as propagated
states change later tokens).

Timing: each setting runs once as warm-up (this run also gives its exits), then all settings
run round-robin (order alternating) as often as ``--cell-budget`` seconds allow (at least 3),
then once more (``--hook-repeats``) with forward hooks on the layer modules. Every duration is
taken on two clocks: wall (perf_counter; the targets are about it) and cpu (the thread's CPU
time: with one intra-op thread torch runs every op in this thread, so this leaves out time the
OS gave to other processes). Figures are medians.

Per setting:
* ``ETR``: Eq. 14 restricted to the part measured: encoder ``1 - mean_samples(mean(n_img,
  n_txt)) / N_E`` (= 2 x ExitStats.expected_time_reduction() without decoder tokens), decoder
  ``1 - sum(n_D) / (tokens * N_D)`` over all rows (beam hypotheses) and timed steps.
* ``CWR``: ExitStats.compute_weighted_reduction() with the other part left out (decoder
  records without encoder tokens, encoder records without decoder tokens); the decoder's
  counts the propagation k/v projections.
* ``meas``: measured reduction ``1 - t_MuE / t_full``.
* ``ideal``: ``(t_full - t_ideal) / t_full`` with ``t_ideal = t_full - sum over skipped
  (sample or row, layer) of that layer's per-row time``. Per-layer times: forward hooks on
  every layer module in the hooked full-depth run(s), scaled by (median full time / hooked full
  time) so that one busy moment cannot skew them; a layer call on R rows costs t/R per row
  (encoder: per stream, image and text calls differ; decoder: per timed step). Decoder: the
  skippable part of a layer is its time *minus* its self-attention k/v projections (hooks on
  ``self_attn.k_proj``/``v_proj``), since MuE still computes those for exited rows (JSON
  ``ideal_noprop`` subtracts the whole layer). Only layer-module calls count: per-layer work
  outside them (the encoder's per-layer relative-position bias and its addition) is skipped
  too by an early exit, which can push meas above ideal.
* ``meas/ideal``. Targets: >= 0.90 at B = 1, >= 0.75 at B = 16.
* JSON ``gap`` (hooked runs, scaled like the above): ``ideal - meas`` split into
  ``layers_excess`` (time inside layer calls minus their ideal: smaller-batch inefficiency, and
  for the decoder the k/v-cache gathers inside attention), ``outside_excess`` (outside layer
  calls, vs the full run: similarity, compaction, mask/bias gathers) and, decoder,
  ``kv_excess`` (self-attention k/v projections vs the full run).

Exit decision overhead (per arch, part, batch) as a fraction of the summed layer time at full
depth (target < 2 %):
* ``direct``: similarity timed in situ (``masked_mean_cosine`` as the encoder calls it, the
  decoder policy's ``decide``, wrapped with a timer in the hooked ``never`` run) plus the other
  ops of the decision path replayed on tensors of the real shapes (median of many calls): the
  compare and ``bool(.any())``, the per-layer row gathers of masks and biases, and for the
  decoder the ``index_select`` of the self- and cross-attention k/v caches that attention does
  for the active rows and the second self-attention layer norm of the exit path;
* ``diff``: (t_never - t_full) / layer time from the round-robin medians (all of the exit
  path's extra cost in situ, but a difference of two noisy medians);
* ``compaction`` (not in ``direct``): the extra cost of each layer at which half the rows exit
  (index bookkeeping and copies), replayed.
The table also gives the minor page faults per timed run of ``full`` and ``never`` (getrusage):
large temporary buffers that the allocator returned to the OS fault in again on every use.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

# Threads must be fixed before torch starts its pools; on a shared 2-core machine one thread
# is both faster and far less noisy than two (OpenMP spin-waits on a loaded core).
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=1)
_THREADS = _pre.parse_known_args()[0].threads
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(_THREADS))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import logging  # noqa: E402

logging.disable(logging.WARNING)  # fairseq's import-time INFO chatter
from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY  # noqa: E402

import mue_fairseq  # noqa: E402,F401  (registers the model)
from mue_fairseq.exits import ExitConfig, ExitStats, masked_mean_cosine  # noqa: E402
from mue_fairseq.testing import deterministic_fill_  # noqa: E402
import mue_fairseq.models.ofa.encoder as ofa_encoder_module  # noqa: E402

# the flags of OFA's released checkpoints / run scripts (widths and depths come from the arch)
RELEASED_FLAGS = dict(
    add_type_embedding=True, code_layernorm_embedding=True, layernorm_embedding=True,
    patch_layernorm_embedding=True, scale_attn=True, scale_fc=True, scale_heads=True,
    share_all_embeddings=True, share_decoder_input_output_embed=True, disable_entangle=True,
    encoder_normalize_before=True, decoder_normalize_before=True, dropout=0.0, attention_dropout=0.0,
    decompose_modalities=True,
)
TARGET_FRACTIONS = (0.75, 0.5, 0.25)  # mean exit layer / depth of the MuE settings
RATIO_TARGET = {1: 0.90, 16: 0.75}
OVERHEAD_TARGET = 0.02
STREAMS = ("image", "text")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- model & inputs
def build_model(arch: str, vocab: int, seed: int):
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    ns = argparse.Namespace(**RELEASED_FLAGS, arch=arch)
    ARCH_CONFIG_REGISTRY[arch](ns)
    model = ARCH_MODEL_REGISTRY[arch].build_model(ns, SimpleNamespace(source_dictionary=d, target_dictionary=d))
    deterministic_fill_(model, seed)
    return model.eval(), d


def make_inputs(d: Dictionary, n: int, text_len: int, image_size: int, seed: int):
    """n samples: right-padded BOS..EOS token rows of varying length, and images of varying
    smoothness/contrast (so that samples differ in how their similarities evolve)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(text_len // 2, text_len, n).round().long()
    tokens = torch.full((n, text_len), d.pad(), dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, :length] = torch.randint(d.nspecial, len(d), (length,), generator=g)
        tokens[i, 0], tokens[i, length - 1] = d.bos(), d.eos()
    images = []
    for i in range(n):
        grid = 2 ** (1 + i % 5)
        low = torch.randn(1, 3, grid, grid, generator=g)
        img = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
        img = img * (0.5 + (i % 4) / 2) + 0.3 * torch.randn(1, 3, image_size, image_size, generator=g)
        images.append(img)
    return tokens, lengths, torch.cat(images)


class CachedPatches:
    """Stands in for encoder.embed_image: returns the precomputed patch embedding of the rows
    about to run (set with .use(rows))."""

    def __init__(self, encoder, images):
        with torch.no_grad():
            self.x, self.ids = encoder.embed_image(images)
        self.current = None

    def use(self, rows):
        self.current = (self.x[rows].contiguous(), self.ids)

    def __call__(self, patch_images):
        assert self.current[0].size(0) == patch_images.size(0)
        return self.current


# ----------------------------------------------------------------------------- timing helpers
# Every duration is measured on two clocks at once: wall (time.perf_counter, what the targets
# are about) and cpu (time.thread_time of the calling thread: with one intra-op thread torch
# runs every op in this thread, so on a shared, loaded machine this clock leaves out the time
# the OS gave to other processes and is far less noisy).
CLOCKS = ("wall", "cpu")


def now():
    return (time.perf_counter(), time.thread_time())


def since(t0):
    t1 = now()
    return (t1[0] - t0[0], t1[1] - t0[1])


def tsum(ts):
    return (sum(t[0] for t in ts), sum(t[1] for t in ts))


def tmed(ts):
    """Per-clock median of a list of (wall, cpu) durations."""
    return (median([t[0] for t in ts]), median([t[1] for t in ts])) if ts else (float("nan"),) * 2


class LayerTimer:
    """Forward hooks timing every call of the given modules: records (key, rows, (wall, cpu))."""

    def __init__(self, modules: dict, rows_dim: int = 1):
        self.records, self._start, self._handles = [], {}, []
        self.enabled = True
        for key, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(key)))
            self._handles.append(module.register_forward_hook(self._post(key, rows_dim)))

    def _pre(self, key):
        def hook(module, args):
            self._start[key] = now()
        return hook

    def _post(self, key, rows_dim):
        def hook(module, args, output):
            t = since(self._start[key])
            if self.enabled:
                self.records.append((key, args[0].size(rows_dim), t))
        return hook

    def take(self):
        out, self.records = self.records, []
        return out

    def remove(self):
        for h in self._handles:
            h.remove()


def plan_repeats(round_seconds: float, budget: "Budget"):
    """(timed repeats, hooked repeats) for a cell whose settings take round_seconds together:
    as many as fit in budget.seconds, within [budget.min_repeats, budget.max_repeats]."""
    fit = int(budget.seconds / max(round_seconds, 1e-6))
    repeats = max(budget.min_repeats, min(budget.max_repeats, fit))
    hooks = max(1, min(budget.hook_repeats, fit - repeats))
    return repeats, hooks


def round_robin(fns: dict, repeats: int, warmup: int = 0):
    """Durations of several settings, interleaved (order alternates per round). Each fn returns
    its own (wall, cpu) duration, or None to have the whole call timed."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            f0 = minor_faults()
            t0 = now()
            own = fns[k]()
            times[k].append(own if own is not None else since(t0))
            FAULTS.setdefault(k, []).append(minor_faults() - f0)
    return times


FAULTS = {}  # setting -> minor page faults per timed run (of the cell being measured)


def minor_faults():
    """Minor page faults of this thread so far (0 where getrusage is not available)."""
    try:
        import resource
        return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt
    except (ImportError, OSError):
        return 0


def micro(fn, repeats: int = 30, inner: int = 5):
    """(wall, cpu) median seconds of one call of fn (`inner` calls per timing)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = now()
        for _ in range(inner):
            fn()
        d = since(t0)
        ts.append((d[0] / inner, d[1] / inner))
    return tmed(ts)


class CallTimer:
    """Wraps a function and sums the (wall, cpu) time of its calls (in-situ timing)."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, (0.0, 0.0), 0

    def __call__(self, *a, **kw):
        t0 = now()
        out = self.fn(*a, **kw)
        d = since(t0)
        self.total = (self.total[0] + d[0], self.total[1] + d[1])
        self.calls += 1
        return out


def pick_threshold(sims, target_layer: float, num_layers: int):
    """sims: (items, num_layers) similarities of full-depth runs. Returns the threshold (a
    midpoint between observed values, or 1.0) whose mean exit layer is closest to target_layer."""
    vals = sorted(set(sims[:, : num_layers - 1].flatten().tolist()))
    cands = [1.0] + [(a + b) / 2 for a, b in zip(vals[:-1], vals[1:])] + ([vals[0] - 1e-3] if vals else [])
    cands = [c for c in cands if -1.0 <= c <= 1.0]
    best = None
    for c in cands:
        mean_layer = exit_layers_at(sims, c, num_layers).float().mean().item()
        key = (abs(mean_layer - target_layer), -c)
        if best is None or key < best[0]:
            best = (key, c, mean_layer)
    return best[1], best[2]


def exit_layers_at(sims, threshold, num_layers):
    """First 1-based layer < N whose similarity is > threshold, else N. sims: (items, N)."""
    over = sims[:, : num_layers - 1] > threshold
    never = torch.full_like(over[:, 0], num_layers, dtype=torch.long)
    first = torch.where(over.any(1), over.float().argmax(1) + 1, never)
    return first.long()


# ----------------------------------------------------------------------------- encoder
class EncoderBench:
    def __init__(self, model, tokens, lengths, images, args):
        self.model, self.enc, self.args = model, model.encoder, args
        self.tokens, self.lengths = tokens, lengths
        self.patches = CachedPatches(self.enc, images)
        self.enc.embed_image = self.patches  # instance attribute shadows the method
        self.N = self.enc.num_layers

    def units(self, batch):
        n = self.tokens.size(0)
        if batch == 1:
            return [[i] for i in range(self.args.b1_samples)]
        return [list(range(i, i + batch)) for i in range(0, n - batch + 1, batch)][:1]

    def prepared(self, rows):
        tok = self.tokens[rows]
        tok = tok[:, : int(tok.ne(self.enc.padding_idx).sum(1).max())].contiguous()  # trim common pads
        return SimpleNamespace(rows=rows, tokens=tok, lengths=self.lengths[rows],
                               dummy=torch.zeros(len(rows), 3, 1, 1), masks=torch.ones(len(rows), dtype=torch.bool))

    def run(self, unit):
        self.patches.use(unit.rows)
        return self.enc(unit.tokens, unit.lengths, patch_images=unit.dummy, patch_masks=unit.masks)

    def set_thresholds(self, thr):
        if thr is None:
            self.model.set_exit_config(None)
        else:
            self.model.set_exit_config(ExitConfig(encoder_exit=True, image_exit_threshold=thr[0],
                                                  text_exit_threshold=thr[1]))

    def calibrate(self):
        unit = self.prepared(list(range(self.tokens.size(0))))
        sims = {s: torch.zeros(len(unit.rows), self.N) for s in STREAMS}

        def observe(name, layer, rows, sim):
            sims[name][rows, layer - 1] = sim

        self.set_thresholds((1.0, 1.0))
        self.enc.similarity_observer = observe
        with torch.no_grad():
            self.run(unit)
        self.enc.similarity_observer = None
        self.set_thresholds(None)
        settings = {}
        for f in TARGET_FRACTIONS:
            picked = [pick_threshold(sims[s], f * self.N, self.N) for s in STREAMS]
            settings[f"MuE@{int(f * 100)}%"] = dict(thresholds=tuple(p[0] for p in picked),
                                                    calibrated_mean_layers=tuple(p[1] for p in picked))
        return settings, {s: sims[s].tolist() for s in STREAMS}

    def measure(self, batch, settings, budget):
        units = [self.prepared(r) for r in self.units(batch)]
        thr = {"full": None, "never": (1.0, 1.0), **{k: v["thresholds"] for k, v in settings.items()}}

        def runner(t):
            def fn():
                self.set_thresholds(t)
                for u in units:
                    self.run(u)
            return fn

        with torch.no_grad():
            # warm-up run of every setting; it also gives the (deterministic) exits and token counts
            exits, t0 = {}, time.perf_counter()
            for name, t in thr.items():
                self.set_thresholds(t)
                outs = [self.run(u) for u in units]
                exits[name] = {
                    "image": torch.cat([o["image_exit_layer"][0] for o in outs]),
                    "text": torch.cat([o["text_exit_layer"][0] for o in outs]),
                }
                if t is None:
                    valid = [(o["modality"][0], ~o["encoder_padding_mask"][0]) for o in outs]
                    img_tok = torch.cat([((m == 1) & v).sum(1) for m, v in valid])
                    txt_tok = torch.cat([((m == 0) & v).sum(1) for m, v in valid])
            repeats, hook_repeats = plan_repeats(time.perf_counter() - t0, budget)
            FAULTS.clear()
            times = round_robin({k: runner(t) for k, t in thr.items()}, repeats)
            faults = {k: median(v) for k, v in FAULTS.items()}
            # per-layer times (hooked runs); per unit the calls come as image L1..LN, text L1..LN
            timer = LayerTimer({i: layer for i, layer in enumerate(self.enc.layers)})
            hooked = {k: [] for k in thr}
            sim_in_situ = []
            for r in range(hook_repeats):
                for name, t in (thr.items() if r % 2 == 0 else list(thr.items())[::-1]):
                    self.set_thresholds(t)
                    if name == "never":  # time the similarity (Eqs. 8-9) where the encoder calls it
                        ofa_encoder_module.masked_mean_cosine = sim_timer = CallTimer(masked_mean_cosine)
                    per_unit = []
                    try:
                        for u in units:
                            t0 = now()
                            self.run(u)
                            per_unit.append((since(t0), timer.take()))
                    finally:
                        ofa_encoder_module.masked_mean_cosine = masked_mean_cosine
                    hooked[name].append(per_unit)
                    if name == "never":
                        sim_in_situ.append(sim_timer.total)
            timer.remove()
            direct = self.direct_overhead(units)
            direct["similarity"] = tmed(sim_in_situ)
            direct["decision"] = tsum([direct[k] for k in ("similarity", "compare_any", "gathers")])
        self.set_thresholds(None)
        out = self.report(batch, units, settings, thr, exits, img_tok, txt_tok, times, hooked, direct)
        out.update(repeats=repeats, hook_repeats=hook_repeats, minor_faults=faults)
        return out

    def per_layer_full(self, hooked_full, n_units, c):
        """[unit][stream][layer] -> median seconds (clock c) of the layer call at full depth."""
        out = []
        for u in range(n_units):
            table = {s: [[] for _ in range(self.N)] for s in STREAMS}
            for rep in hooked_full:
                seen = [0] * self.N
                for layer, rows, t in rep[u][1]:
                    table[STREAMS[seen[layer]]][layer].append(t[c])
                    seen[layer] += 1
            out.append({s: [median(v) for v in table[s]] for s in STREAMS})
        return out

    def report(self, batch, units, settings, thr, exits, img_tok, txt_tok, times, hooked, direct):
        N = self.N
        names = ["full", "never", *settings]
        out_rows = {}
        for name in names:
            ex = exits[name]
            stats = ExitStats(N, 1, self.enc.embed_dim, self.enc.layers[0].fc1.out_features, decomposed_encoder=True)
            stats.add_batch(ex["image"], ex["text"], img_tok, txt_tok, [[] for _ in range(len(img_tok))])
            etr = 2 * stats.expected_time_reduction()  # no decoder tokens: ETR = (1 - n_E/N_E) / 2
            etr_direct = 1 - ((ex["image"] + ex["text"]).float() / 2).mean().item() / N
            assert abs(etr - etr_direct) < 1e-9, (etr, etr_direct)
            out_rows[name] = dict(
                setting=name, thresholds=thr[name], etr=etr, cwr=stats.compute_weighted_reduction(),
                mean_exit_image=ex["image"].float().mean().item(), mean_exit_text=ex["text"].float().mean().item(),
                exit_hist_image=torch.bincount(ex["image"], minlength=N + 1)[1:].tolist(),
                exit_hist_text=torch.bincount(ex["text"], minlength=N + 1)[1:].tolist(),
            )
            if name in settings:
                out_rows[name]["calibrated_mean_layers"] = settings[name]["calibrated_mean_layers"]
        overhead, layer_ms, layer_sum_ms = {}, {}, {}
        for c, clock in enumerate(CLOCKS):
            med = {k: median([t[c] for t in v]) for k, v in times.items()}

            def hooked_split(name):
                """medians over hooked repeats of (total, inside layer calls, outside), and the
                factor that scales them to the setting's median un-hooked time."""
                tot = [sum(p[0][c] for p in rep) for rep in hooked[name]]
                lay = [sum(t[c] for p in rep for _, _, t in p[1]) for rep in hooked[name]]
                h = median(tot), median(lay), median([a - b for a, b in zip(tot, lay)])
                return h, med[name] / h[0]

            full_h, k_full = hooked_split("full")
            # per-layer times of the hooked full-depth runs, scaled to the median full-depth time
            # (the few hooked runs are otherwise at the mercy of a busy moment)
            layer_t = [{s: [k_full * x for x in lt[s]] for s in STREAMS}
                       for lt in self.per_layer_full(hooked["full"], len(units), c)]
            layer_sum_full = sum(sum(lt[s]) for lt in layer_t for s in STREAMS)
            row_t = []  # per sample: per-row layer time (its unit's call / rows)
            for u, lt in zip(units, layer_t):
                for _ in u.rows:
                    row_t.append({s: [x / len(u.rows) for x in lt[s]] for s in STREAMS})
            for name in names:
                ex = exits[name]
                skipped = sum(sum(row_t[i][s][int(ex[s][i]):]) for i in range(len(row_t)) for s in STREAMS)
                t_full, t = med["full"], med[name]
                meas, ideal = 1 - t / t_full, skipped / t_full
                h, k = hooked_split(name)
                # gap (ideal - meas) = layers_excess + outside_excess
                out_rows[name][clock] = dict(
                    t_ms=1e3 * t, t_full_ms=1e3 * t_full, times_ms=[1e3 * x[c] for x in times[name]],
                    measured=meas, ideal=ideal, ratio=(meas / ideal) if ideal > 1e-9 else None,
                    gap=dict(layers_excess=(k * h[1] - (k_full * full_h[1] - skipped)) / t_full,
                             outside_excess=(k * h[2] - k_full * full_h[2]) / t_full,
                             hooked_total_ms=1e3 * h[0], hooked_layers_ms=1e3 * h[1], hooked_outside_ms=1e3 * h[2]),
                )
            overhead[clock] = dict(diff=(med["never"] - med["full"]) / layer_sum_full,
                                   direct=direct["decision"][c] / layer_sum_full,
                                   parts={k: v[c] / layer_sum_full for k, v in direct.items()})
            layer_ms[clock] = {s: [1e3 * sum(lt[s][i] for lt in layer_t) for i in range(N)] for s in STREAMS}
            layer_sum_ms[clock] = 1e3 * layer_sum_full
        return dict(part="encoder", batch=batch, units=len(units), rows=sum(len(u.rows) for u in units),
                    settings=[out_rows[n] for n in names], layer_ms_full=layer_ms, layer_sum_full_ms=layer_sum_ms,
                    overhead=overhead)

    def direct_overhead(self, units):
        """Replay the encoder's per-layer exit ops on captured full-depth tensors (summed over
        the units' layer calls)."""
        captured = []
        hooks = [layer.register_forward_hook(lambda m, a, o: captured.append((a[0], o)))
                 for layer in self.enc.layers]
        self.set_thresholds((1.0, 1.0))
        totals = {k: (0.0, 0.0) for k in ("compare_any", "gathers", "compaction")}

        def add(key, t):
            totals[key] = (totals[key][0] + t[0], totals[key][1] + t[1])

        for u in units:
            captured.clear()
            self.run(u)
            bsz = len(u.rows)
            for h_in, h_out in list(captured):
                length = h_in.size(0)
                pad = torch.zeros(bsz, length, dtype=torch.bool)
                pad[:, length - 1:] = bsz > 1  # some pads, as text rows have
                bias = torch.randn(bsz, self.enc.num_heads, length, length)
                active = torch.arange(bsz)

                sims = torch.rand(bsz)

                def compare_any():  # exits = similarity > threshold; bool(exits.any())
                    return bool((sims > 1.0).any())

                def gathers():  # rows_pad = pad[active]; bias[active] (vs. the batch's own tensors)
                    return pad[active], bias[active]

                exits = torch.zeros(bsz, dtype=torch.bool)
                exits[::2] = True
                output = h_in.clone()
                exit_layer = torch.full((bsz,), self.N)

                def compaction():  # a layer at which half the rows exit
                    done = active[exits]
                    output[:, done] = h_out[:, exits]
                    exit_layer[done] = 1
                    return active[~exits], h_out[:, ~exits]

                add("compare_any", micro(compare_any))
                add("gathers", micro(gathers))
                add("compaction", micro(compaction))
        for h in hooks:
            h.remove()
        self.set_thresholds(None)
        return totals


# ----------------------------------------------------------------------------- decoder
class DecoderBench:
    def __init__(self, model, enc_bench: EncoderBench, d: Dictionary, args):
        self.model, self.dec, self.args = model, model.decoder, args
        self.enc_bench = enc_bench
        self.N = self.dec.num_layers
        g = torch.Generator().manual_seed(args.seed + 1)
        n_rows = enc_bench.tokens.size(0) * args.beam
        self.tokens = torch.randint(d.nspecial, len(d), (n_rows, args.steps + 1), generator=g)
        self.tokens[:, 0] = d.bos()

    def unit(self, batch):
        """Encoder output of the first `batch` samples expanded to `beam` rows each, the rows'
        tokens, and the incremental state after the BOS step (run once, at full depth)."""
        eb = self.enc_bench
        eb.set_thresholds(None)
        unit = SimpleNamespace(tokens=self.tokens[: batch * self.args.beam].contiguous())
        with torch.no_grad():
            enc_out = eb.run(eb.prepared(list(range(batch))))
            order = torch.arange(batch).repeat_interleave(self.args.beam)
            unit.enc_out = eb.enc.reorder_encoder_out(enc_out, order)
            self.dec.exit_policy = None
            unit.prefilled = {}
            self.dec(unit.tokens[:, :1], encoder_out=unit.enc_out, incremental_state=unit.prefilled)
        return unit

    @staticmethod
    def after_bos(unit):
        """A fresh copy of the incremental state after the BOS step. The caches' tensors are
        shared: decoding never writes into them (appending builds new tensors), it only replaces
        entries of the per-module dicts, which are copied here."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in unit.prefilled.items()}

    def policy(self, threshold):
        if threshold is None:
            return None
        self.model.set_exit_config(ExitConfig(decoder_exit_policy="similarity", decoder_exit_threshold=threshold),
                                   max_len=self.args.steps + 1)
        policy = self.dec.exit_policy
        self.model.set_exit_config(None)
        return policy

    def decode(self, unit, policy, on_timed=None, keep_state=False):
        """Timed steps 1..T from the state after the (full-depth) BOS step. Returns ((wall, cpu)
        seconds, [exit layers per step], the incremental state if asked)."""
        dec = self.dec
        inc = self.after_bos(unit)
        dec.exit_policy = policy
        if on_timed:
            on_timed(True)
        layers = []
        t0 = now()
        for t in range(2, unit.tokens.size(1) + 1):
            _, extra = dec(unit.tokens[:, :t], encoder_out=unit.enc_out, incremental_state=inc)
            layers.append(extra.get("exit_layer"))
        elapsed = since(t0)
        if on_timed:
            on_timed(False)
        dec.exit_policy = None
        return elapsed, layers, (inc if keep_state else None)

    def calibrate(self, batch):
        unit = self.unit(batch)
        rows = unit.tokens.size(0)
        steps = unit.tokens.size(1) - 1
        sims = torch.zeros(steps, rows, self.N)
        step = [0]

        def observe(name, layer, active, sim):
            sims[step[0], active, layer - 1] = sim
            if layer == self.N:
                step[0] += 1

        self.dec.similarity_observer = None
        with torch.no_grad():
            self.dec.similarity_observer = None
            policy = self.policy(1.0)
            # the observer must not see the untimed BOS step (it runs without exit policy, and
            # then the observer is not called), so attach it right away
            self.dec.similarity_observer = observe
            self.decode(unit, policy)
            self.dec.similarity_observer = None
        flat = sims.reshape(-1, self.N)
        settings = {}
        for f in TARGET_FRACTIONS:
            t, mean_layer = pick_threshold(flat, f * self.N, self.N)
            settings[f"MuE@{int(f * 100)}%"] = dict(thresholds=t, calibrated_mean_layers=mean_layer)
        return settings, sims.tolist()

    def measure(self, batch, settings, budget):
        unit = self.unit(batch)
        rows = unit.tokens.size(0)
        thr = {"full": None, "never": 1.0, **{k: v["thresholds"] for k, v in settings.items()}}
        policies = {k: self.policy(t) for k, t in thr.items()}
        with torch.no_grad():
            # warm-up run of every setting; it also gives the (deterministic) exits
            exits, t0 = {}, time.perf_counter()
            for name, p in policies.items():
                _, layers, _ = self.decode(unit, p)
                exits[name] = (torch.stack(layers) if p is not None
                               else torch.full((len(layers), rows), self.N, dtype=torch.long))
            repeats, hook_repeats = plan_repeats(time.perf_counter() - t0, budget)
            FAULTS.clear()
            times = round_robin({k: (lambda p=p: self.decode(unit, p)[0]) for k, p in policies.items()}, repeats)
            faults = {k: median(v) for k, v in FAULTS.items()}
            mods = {}
            for i, layer in enumerate(self.dec.layers):
                mods[("layer", i)] = layer
                mods[("k", i)] = layer.self_attn.k_proj
                mods[("v", i)] = layer.self_attn.v_proj
            timer = LayerTimer(mods)
            hooked = {k: [] for k in thr}
            sim_in_situ = []

            def switch(on):  # record the timed steps only
                if on:
                    timer.take()
                timer.enabled = on

            for r in range(hook_repeats):
                for name, p in (policies.items() if r % 2 == 0 else list(policies.items())[::-1]):
                    if name == "never":  # time the policy's decision (cosine + threshold) in situ
                        p.decide = sim_timer = CallTimer(p.decide)
                    try:
                        total, _, _ = self.decode(unit, p, on_timed=switch)
                    finally:
                        p.__dict__.pop("decide", None) if p is not None else None
                    hooked[name].append((total, timer.take()))
                    timer.enabled = True
                    if name == "never":
                        sim_in_situ.append(sim_timer.total)
            timer.remove()
            direct = self.direct_overhead(unit)  # per step
            direct["similarity"] = tuple(x / (unit.tokens.size(1) - 1) for x in tmed(sim_in_situ))  # per step
            direct["decision"] = tsum([direct[k] for k in
                                       ("similarity", "compare_any", "gathers", "cache_gathers", "duplicate_ln")])
        out = self.report(batch, rows, settings, thr, exits, times, hooked, direct)
        out.update(repeats=repeats, hook_repeats=hook_repeats, minor_faults=faults)
        return out

    def per_step_layer(self, hooked_full, steps, c):
        """Full depth: [step][layer] median seconds (clock c) of the layer call and of its
        self-attention k/v projections (which run inside that call)."""
        lay = [[[] for _ in range(self.N)] for _ in range(steps)]
        kv = [[[] for _ in range(self.N)] for _ in range(steps)]
        for _, recs in hooked_full:
            seen, kv_acc = {}, {}
            for (kind, i), rows, t in recs:
                s = seen.get(i, 0)
                if kind == "layer":
                    lay[s][i].append(t[c])
                    seen[i] = s + 1
                else:  # k/v of layer i run inside its (still open) call of step s
                    kv_acc[(s, i)] = kv_acc.get((s, i), 0.0) + t[c]
            for (s, i), t in kv_acc.items():
                kv[s][i].append(t)
        return [[median(x) for x in row] for row in lay], [[median(x) for x in row] for row in kv]

    def report(self, batch, rows, settings, thr, exits, times, hooked, direct):
        N = self.N
        steps = exits["full"].size(0)
        names = ["full", "never", *settings]
        out_rows = {}
        for name in names:
            ex = exits[name]  # (steps, rows)
            stats = ExitStats(1, N, self.dec.embed_dim, self.dec.layers[0].fc1.out_features)
            per_row = ex.t()
            stats.add_batch([0] * rows, [0] * rows, [0] * rows, [0] * rows, per_row, propagated_layers=N - per_row)
            out_rows[name] = dict(
                setting=name, thresholds=thr[name], etr=1 - ex.float().mean().item() / N,
                cwr=stats.compute_weighted_reduction(), mean_exit=ex.float().mean().item(),
                exit_hist=torch.bincount(ex.flatten(), minlength=N + 1)[1:].tolist(),
            )
            if name in settings:
                out_rows[name]["calibrated_mean_layers"] = settings[name]["calibrated_mean_layers"]
        overhead, layer_ms, layer_sum_ms = {}, {}, {}
        for c, clock in enumerate(CLOCKS):
            med = {k: median([t[c] for t in v]) for k, v in times.items()}

            def hooked_split(name):
                """medians over hooked runs of (total, inside layer calls, self-attn k/v
                projections), and the factor that scales them to the median un-hooked time."""
                tot = [h[0][c] for h in hooked[name]]
                lay_t = [sum(t[c] for (kind, _), _, t in h[1] if kind == "layer") for h in hooked[name]]
                kv_t = [sum(t[c] for (kind, _), _, t in h[1] if kind != "layer") for h in hooked[name]]
                h = median(tot), median(lay_t), median(kv_t)
                return h, med[name] / h[0]

            full_h, k_full = hooked_split("full")
            lay, kv = self.per_step_layer(hooked["full"], steps, c)
            lay = [[k_full * x for x in row] for row in lay]  # scaled to the median full-depth time
            kv = [[k_full * x for x in row] for row in kv]
            layer_sum_full = sum(sum(r) for r in lay)
            full_outside = k_full * (full_h[0] - full_h[1])
            for name in names:
                ex = exits[name]
                skipped = skipped_noprop = 0.0
                for s in range(steps):
                    for i in range(N):
                        share = int((ex[s] <= i).sum()) / rows  # rows with exit layer <= i skip layer i+1
                        skipped += share * (lay[s][i] - kv[s][i])
                        skipped_noprop += share * lay[s][i]
                t_full, t = med["full"], med[name]
                meas, ideal = 1 - t / t_full, skipped / t_full
                h, k = hooked_split(name)
                # a layer's cost = skippable part a (the layer minus its self-attention k/v) + the
                # k/v part b. Full depth runs a + b inside layer calls; the exit path runs a inside
                # the calls and b (all rows: active and propagated) outside them.
                # gap (ideal - meas) = layers_excess + kv_excess + outside_excess
                ideal_a = k_full * (full_h[1] - full_h[2]) - skipped
                inside, kv_t = (k * (h[1] - h[2]), k * h[2]) if name == "full" else (k * h[1], k * h[2])
                outside = t - inside - kv_t
                out_rows[name][clock] = dict(
                    t_ms=1e3 * t, t_full_ms=1e3 * t_full, times_ms=[1e3 * x[c] for x in times[name]],
                    measured=meas, ideal=ideal, ideal_noprop=skipped_noprop / t_full,
                    ratio=(meas / ideal) if ideal > 1e-9 else None,
                    gap=dict(layers_excess=(inside - ideal_a) / t_full,
                             kv_excess=(kv_t - k_full * full_h[2]) / t_full,
                             outside_excess=(outside - full_outside) / t_full,
                             hooked_total_ms=1e3 * h[0], hooked_layers_ms=1e3 * h[1], hooked_kv_ms=1e3 * h[2]),
                )
            overhead[clock] = dict(diff=(med["never"] - med["full"]) / layer_sum_full,
                                   direct=direct["decision"][c] * steps / layer_sum_full,
                                   parts={k: v[c] * steps / layer_sum_full for k, v in direct.items()})
            layer_ms[clock] = [1e3 * sum(lay[s][i] for s in range(steps)) for i in range(N)]
            layer_ms[clock + "_kv"] = [1e3 * sum(kv[s][i] for s in range(steps)) for i in range(N)]
            layer_sum_ms[clock] = 1e3 * layer_sum_full
        return dict(part="decoder", batch=batch, rows=rows, steps=steps, settings=[out_rows[n] for n in names],
                    layer_ms_full=layer_ms, layer_sum_full_ms=layer_sum_ms, overhead=overhead)

    def direct_overhead(self, unit):
        """Replay the decoder's per-layer exit ops of one step on real tensors (per step, summed
        over layers). Cache sizes are those after the last step: for the self-attention cache an
        upper bound."""
        _, _, inc = self.decode(unit, None, keep_state=True)
        rows = unit.tokens.size(0)
        enc_pad = unit.enc_out["encoder_padding_mask"][0]
        src_len = enc_pad.size(1)
        active = torch.arange(rows)
        exits_half = torch.zeros(rows, dtype=torch.bool)
        exits_half[::2] = True
        keys = ("compare_any", "gathers", "cache_gathers", "duplicate_ln", "compaction")
        totals = {k: (0.0, 0.0) for k in keys}

        def add(key, t):
            totals[key] = (totals[key][0] + t[0], totals[key][1] + t[1])

        for li, layer in enumerate(self.dec.layers):
            sk = layer.self_attn.cached_kv(inc)
            ck = layer.encoder_attn.cached_kv(inc)
            h_in = torch.randn(1, rows, self.dec.embed_dim)
            h_out = h_in + 0.1 * torch.randn_like(h_in)
            cross_bias = torch.randn(rows, self.dec.num_heads, 1, src_len)

            sims = torch.rand(rows)

            def compare_any():  # bool(exits.any()) of the step loop
                return bool((sims > 1.0).any())

            def gathers():  # rows_enc_pad, rows_cross of _forward_step_with_exits
                return enc_pad.index_select(0, active), cross_bias.index_select(0, active)

            def cache_gathers():  # OFAAttention.forward with rows: self and cross k/v caches
                return [x.index_select(0, active) for x in
                        (sk["prev_key"], sk["prev_value"], ck["prev_key"], ck["prev_value"])]

            def duplicate_ln():  # self_attn_input(layer_input) besides the layer's own pre-LN
                return layer.self_attn_input(h_in)

            final = torch.zeros_like(h_in)
            exit_layer = torch.full((rows,), self.N)

            def compaction():  # a layer at which half the rows exit, and the next layer's index_copy
                done = active[exits_half]
                final[:, done] = h_out[:, exits_half]
                exit_layer[done] = 1
                li_ = h_in.index_copy(1, done, h_out[:, exits_half])
                keep = ~exits_half
                act, o = active[keep], h_out[:, keep]
                return li_.index_copy(1, act, o)

            if li + 1 < self.N:  # no decision after the last layer
                add("compare_any", micro(compare_any))
            add("gathers", micro(gathers))
            add("cache_gathers", micro(cache_gathers, repeats=7, inner=1))
            add("duplicate_ln", micro(duplicate_ln))
            add("compaction", micro(compaction))
        return totals


# ----------------------------------------------------------------------------- output
def pct(x, digits=1):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def fmt_thr(t):
    if t is None:
        return "-"
    if isinstance(t, (tuple, list)):
        return "/".join(f"{x:.4f}" for x in t)
    return f"{t:.4f}"


def markdown(results, meta):
    lines = [
        f"MuE exit benchmark: torch {meta['torch']}, {meta['threads']} thread(s), image {meta['image_size']} px, "
        f"text <= {meta['text_len']} tokens, decoder {meta['steps']} timed steps x beam {meta['beam']}; "
        f"medians of the runs given per cell below (at least {meta['budget']['min_repeats']}); load average at the end "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average'] or [])}.",
        "",
        "| arch | part | B | setting | threshold(s) | mean exit | ETR | CWR | t full ms | t ms "
        "| meas | ideal | meas/ideal | cpu: meas | ideal | meas/ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(s, clock, batch):
        r = s[clock]["ratio"]
        if s["setting"] in ("full", "never") or r is None:
            return ""
        return f"{r:.2f}" + (" ✗" if r < RATIO_TARGET.get(batch, RATIO_TARGET[16]) else "")

    for r in results:
        for s in r["settings"]:
            if r["part"] == "encoder":
                mean_exit = f"{s['mean_exit_image']:.2f}/{s['mean_exit_text']:.2f}"
            else:
                mean_exit = f"{s['mean_exit']:.2f}"
            w, c = s["wall"], s["cpu"]
            no_ideal = s["setting"] == "full"
            lines.append(
                f"| {r['arch']} | {r['part']} | {r['batch']} | {s['setting']} | {fmt_thr(s['thresholds'])} | {mean_exit} "
                f"| {pct(s['etr'])} | {pct(s['cwr'])} | {w['t_full_ms']:.1f} | {w['t_ms']:.1f} | {pct(w['measured'])} "
                f"| {'' if no_ideal else pct(w['ideal'])} | {ratio(s, 'wall', r['batch'])} "
                f"| {pct(c['measured'])} | {'' if no_ideal else pct(c['ideal'])} | {ratio(s, 'cpu', r['batch'])} |"
            )
    lines += [
        "",
        "Exit decision overhead, as a fraction of the summed layer time at full depth (target < 2%):",
        "",
        "| arch | part | B | rows | runs (hooked) | layer ms (wall/cpu) | direct (wall/cpu) | similarity | row gathers "
        "| cache gathers | dup. LN | diff never-full (wall/cpu) | compaction | page faults full/never |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ow, oc = r["overhead"]["wall"], r["overhead"]["cpu"]
        flag = " ✗" if oc["direct"] >= OVERHEAD_TARGET else ""
        parts = oc["parts"]
        lines.append(
            f"| {r['arch']} | {r['part']} | {r['batch']} | {r['rows']} | {r['repeats']} ({r['hook_repeats']}) "
            f"| {r['layer_sum_full_ms']['wall']:.1f}/{r['layer_sum_full_ms']['cpu']:.1f} "
            f"| {pct(ow['direct'], 2)}/{pct(oc['direct'], 2)}{flag} | {pct(parts['similarity'], 2)} "
            f"| {pct(parts['gathers'], 2)} | {pct(parts.get('cache_gathers'), 2) if 'cache_gathers' in parts else '-'} "
            f"| {pct(parts.get('duplicate_ln'), 2) if 'duplicate_ln' in parts else '-'} "
            f"| {pct(ow['diff'])}/{pct(oc['diff'])} | {pct(parts['compaction'], 2)} "
            f"| {r['minor_faults'].get('full', 0):.0f}/{r['minor_faults'].get('never', 0):.0f} |"
        )
    lines += [
        "",
        "mean exit: encoder image/text stream, decoder over all timed tokens (depths "
        + ", ".join(f"{a}: {n}" for a, n in meta["depths"].items()) + " encoder+decoder layers). "
        "meas = 1 - t/t_full (wall clock; `cpu:` the same on the thread's CPU time, which leaves out time "
        "taken by other processes); ideal = time of the skipped layers at their full-depth per-row cost / t_full "
        "(decoder: without the k/v projections MuE still runs for exited rows); ✗ = below target "
        f"(meas/ideal >= {RATIO_TARGET[1]:.2f} at B=1, >= {RATIO_TARGET[16]:.2f} at B=16; overhead < 2%, judged on cpu). "
        "Overhead parts (cpu): similarity = cosine + threshold + any(); row gathers = per-layer index of masks/biases; "
        "cache gathers = index_select of the decoder's k/v caches in attention; dup. LN = the decoder's second "
        "self-attention layer norm; compaction (not in `direct`) = extra cost of a layer at which half the rows exit, "
        "per layer; page faults = minor page faults per timed run (median; fresh large buffers that the allocator "
        "had handed back to the OS).",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ofa_tiny only, shorter time budget (under a minute)")
    p.add_argument("--out", help="write all figures as JSON here")
    p.add_argument("--archs", nargs="+", help="default: ofa_tiny ofa_base (quick: ofa_tiny)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--cell-budget", type=float,
                   help="seconds of timed runs per (arch, part, batch): repeats are fitted to it "
                        "(default 20, quick 6)")
    p.add_argument("--repeats", type=int, help="fixed number of timed runs per setting (overrides --cell-budget)")
    p.add_argument("--hook-repeats", type=int, help="most runs per setting with per-layer hooks (default 2, quick 1)")
    p.add_argument("--image-size", type=int, default=160, help="image side in px (patch grid side = px/16)")
    p.add_argument("--text-len", type=int, default=24, help="longest text (tokens); rows range over half to all of it")
    p.add_argument("--steps", type=int, default=12, help="timed decoder steps")
    p.add_argument("--beam", type=int, default=5, help="decoder rows per sample")
    p.add_argument("--b1-samples", type=int, default=4, help="samples run one by one at batch 1 (encoder)")
    p.add_argument("--vocab", type=int, default=4000, help="dictionary size")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    archs = args.archs or (["ofa_tiny"] if args.quick else ["ofa_tiny", "ofa_base"])
    budget = SimpleNamespace(
        seconds=args.cell_budget or (6.0 if args.quick else 20.0),
        min_repeats=args.repeats or 3, max_repeats=args.repeats or (7 if args.quick else 9),
        hook_repeats=args.hook_repeats or (1 if args.quick else 2),
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n_samples = max(max(args.batch_sizes), args.b1_samples)

    start = time.time()
    results, calibration, depths = [], {}, {}
    for arch in archs:
        t0 = time.time()
        model, d = build_model(arch, args.vocab, args.seed)
        depths[arch] = f"{model.encoder.num_layers}+{model.decoder.num_layers}"
        tokens, lengths, images = make_inputs(d, n_samples, args.text_len, args.image_size, args.seed)
        enc = EncoderBench(model, tokens, lengths, images, args)
        dec = DecoderBench(model, enc, d, args)
        log(f"[{arch}] built and patches embedded in {time.time() - t0:.1f}s")
        with torch.no_grad():
            enc_settings, enc_sims = enc.calibrate()
            dec_settings, dec_sims = dec.calibrate(max(args.batch_sizes))
        calibration[arch] = dict(encoder=enc_settings, decoder=dec_settings,
                                 encoder_similarities=enc_sims, decoder_similarities=dec_sims)
        for batch in args.batch_sizes:
            t1 = time.time()
            r = enc.measure(batch, enc_settings, budget)
            r["arch"] = arch
            results.append(r)
            log(f"[{arch}] encoder B={batch}: {time.time() - t1:.1f}s")
        for batch in args.batch_sizes:
            t1 = time.time()
            r = dec.measure(batch, dec_settings, budget)
            r["arch"] = arch
            results.append(r)
            log(f"[{arch}] decoder B={batch}: {time.time() - t1:.1f}s")
        del model, enc, dec
    meta = dict(torch=torch.__version__, python=platform.python_version(), threads=args.threads,
                cpu_count=os.cpu_count(), image_size=args.image_size, text_len=args.text_len, steps=args.steps,
                beam=args.beam, budget=vars(budget), b1_samples=args.b1_samples,
                vocab=args.vocab, archs=archs, depths=depths, seconds=time.time() - start,
                targets=dict(ratio=RATIO_TARGET, overhead=OVERHEAD_TARGET),
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    # order the table by arch, part, batch
    results.sort(key=lambda r: (archs.index(r["arch"]), r["part"] != "encoder", r["batch"]))
    print(markdown(results, meta))
    log(f"total {meta['seconds']:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results, calibration=calibration), f, indent=1)


if __name__ == "__main__":
    main()
