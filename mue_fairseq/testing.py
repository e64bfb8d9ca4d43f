"""Helpers shared by the test-suite and by anyone who checks parity against another implementation.

``deterministic_fill_`` fills a model's weights from (parameter name, shape, seed) alone, so two
implementations with the same state-dict keys get identical weights without storing them.
"""
import zlib

import torch


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))


@torch.no_grad()
def deterministic_fill_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every floating-point tensor of ``module.state_dict()`` deterministically.

    Rules (by name and shape only):
      * ``*.running_mean``: N(0, 0.1²); ``*.running_var``: U(0.5, 1.5)  (non-trivial batch-norm stats)
      * 1-D ``*.weight`` and ``*c_attn`` (norm gains, head scales): 1 + N(0, 0.1²)
      * other 1-D tensors (biases): N(0, 0.02²)
      * n-D tensors: N(0, 1/fan_in) with fan_in = prod(shape[1:])
    Tied tensors (shared storage) are filled once, under the first of their names in sorted
    order, so implementations that tie the same weights agree. Integer/bool buffers are kept.
    """
    filled = set()
    state = module.state_dict(keep_vars=True)
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        key = tensor.data_ptr()
        if key in filled:
            continue
        filled.add(key)
        g = _generator(name, seed)
        shape = tuple(tensor.shape)
        if name.endswith("running_mean"):
            value = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        elif name.endswith("running_var"):
            value = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        elif len(shape) == 1 and (name.endswith(".weight") or name.endswith("c_attn")):
            value = 1.0 + torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        elif len(shape) <= 1:
            value = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            value = torch.randn(shape, generator=g, dtype=torch.float64) / fan_in**0.5
        tensor.data.copy_(value.to(tensor.dtype))
    return module
