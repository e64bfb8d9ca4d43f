"""Position tables of OFA: relative-position buckets (1-D for text, 2-D for image patches)
and the absolute index of each image patch in the image position embedding.

The bucket tables are buffers of the model (their names are part of OFA's state dict);
their values must be exactly the original's, so the arithmetic below keeps OFA's dtypes.
"""
import math

import torch
from fairseq.modules import LayerNorm
from torch import nn


def token_relative_buckets(bucket_size: int, max_position: int) -> torch.LongTensor:
    """Bucket index of every (query, key) text-position pair: `(max_position, max_position)`.

    Offsets with |offset| < bucket_size // 2 get their own bucket; larger offsets share
    log-spaced buckets. Values lie in [0, 2 * bucket_size - 2].
    """
    offset = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    half = bucket_size // 2
    magnitude = torch.where((offset < half) & (offset > -half), half - 1, offset.abs())
    # float32 on purpose: the rounding of this log decides bucket ids far from the diagonal
    log_bucket = torch.ceil(
        torch.log(magnitude / half) / math.log((max_position - 1) / half) * (half - 1)
    ) + half
    bucket = torch.where(magnitude.le(half), offset, log_bucket.int() * torch.sign(offset))
    return bucket.long() + bucket_size - 1


def image_relative_buckets(bucket_size: int) -> torch.LongTensor:
    """Bucket index of every pair of image positions: `(bucket_size² + 1, bucket_size² + 1)`.

    Position 0 is a special slot (OFA reserves it); patch (row, col) has position
    ``row * bucket_size + col + 1``. Pairs of patches get a bucket from their 2-D offset;
    pairs involving slot 0 get the last three buckets.
    """
    num_buckets = (2 * bucket_size - 1) ** 2 + 3
    rows, cols = torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + bucket_size - 1
    d_col = cols[:, None] - cols[None, :] + bucket_size - 1
    size = bucket_size * bucket_size + 1
    table = torch.zeros(size, size, dtype=torch.long)
    table[1:, 1:] = d_row * (2 * bucket_size - 1) + d_col
    table[0, :] = num_buckets - 3
    table[:, 0] = num_buckets - 2
    table[0, 0] = num_buckets - 1
    return table


def relative_bias(table: nn.Embedding, buckets: torch.Tensor) -> torch.Tensor:
    """Per-head bias of bucketed position pairs: `(q_len, k_len)` buckets -> `(1, heads, q_len, k_len)`."""
    return table(buckets).permute(2, 0, 1).unsqueeze(0)


def num_image_buckets(bucket_size: int) -> int:
    return (2 * bucket_size - 1) ** 2 + 3


def image_position_ids(height: int, width: int, bucket_size: int, device=None) -> torch.LongTensor:
    """Position id of each patch of a `height x width` grid, row-major: `(height * width,)`."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (rows * bucket_size + cols + 1).flatten()


def decoder_image_position_ids(window: int, bucket_size: int) -> torch.LongTensor:
    """OFA's `decoder.image_position_idx` buffer (used for image-code generation): slot 0, the
    `window x window` grid, then 769 entries of 1024. Kept for state-dict compatibility."""
    grid = image_position_ids(window, window, bucket_size)
    return torch.cat([torch.tensor([0]), grid, torch.full((769,), 1024)])


def add_position_tables(module: nn.Module, dim: int, num_heads: int, num_layers: int, max_positions: int,
                        token_bucket_size: int, image_bucket_size: int, attn_scale_factor: float) -> None:
    """Give an OFA encoder/decoder its position parameters and buffers, under OFA's names:
    absolute text/image position embeddings with their layer norms, the query scaling of the
    position bias, per-layer text/image relative-position tables and the bucket buffers."""
    module.embed_positions = nn.Embedding(max_positions + 2, dim)
    module.embed_image_positions = nn.Embedding(image_bucket_size**2 + 1, dim)
    module.pos_ln = LayerNorm(dim)
    module.image_pos_ln = LayerNorm(dim)
    module.pos_scaling = float(dim / num_heads * attn_scale_factor) ** -0.5
    module.token_rel_pos_table_list = nn.ModuleList(
        [nn.Embedding(2 * token_bucket_size - 1, num_heads) for _ in range(num_layers)]
    )
    module.image_rel_pos_table_list = nn.ModuleList(
        [nn.Embedding(num_image_buckets(image_bucket_size), num_heads) for _ in range(num_layers)]
    )
    # OFA builds the text buckets for 1024 positions whatever --max-*-positions says
    module.register_buffer("token_rp_bucket", token_relative_buckets(token_bucket_size, 1024))
    module.register_buffer("image_rp_bucket", image_relative_buckets(image_bucket_size))
