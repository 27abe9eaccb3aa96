"""BatchedCache: one KV cache for a changing set of sequences, left-padded to a common width.

    keys / values per layer  [B, H, W, D]   row b holds its real positions at the right end
    mask                     [B, W]         1 at real positions, 0 at padding

Rows join by left-padding the narrower of the two caches and concatenating along the batch; rows leave by
index selection, after which columns that are padding in every row are trimmed. The model sees a plain
transformers DynamicCache plus the mask, and each row's positions are counted from its own first real token,
so RoPE and attention give a row the same result as in a batch of one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class BatchedCache:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # [B, W] long

    @classmethod
    def empty(cls, mask: torch.Tensor) -> "BatchedCache":
        """A cache for a prefill forward over left-padded inputs with this mask [B, P]."""
        return cls(DynamicCache(), mask)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def positions(self) -> torch.Tensor:
        """[B, 1]: the position of each row's next token (its count of real tokens so far)."""
        return self.mask.sum(-1, keepdim=True)

    def extend_mask(self) -> torch.Tensor:
        """Mark one more real column (the token being decoded); returns the mask the forward needs [B, W + 1]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def join(self, other: "BatchedCache") -> "BatchedCache":
        width = max(self.width, other.width)
        layers = [
            (torch.cat([_pad_left(k1, width), _pad_left(k2, width)]), torch.cat([_pad_left(v1, width), _pad_left(v2, width)]))
            for (k1, v1, *_), (k2, v2, *_) in zip(self.cache, other.cache)
        ]
        mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(other.mask, (width - other.width, 0))])
        return BatchedCache(DynamicCache(layers), mask)

    def select(self, rows: list[int]) -> "BatchedCache":
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are padding in every row
        layers = [(k.index_select(0, index.to(k.device))[:, :, start:], v.index_select(0, index.to(v.device))[:, :, start:])
                  for k, v, *_ in self.cache]
        return BatchedCache(DynamicCache(layers), mask[:, start:])


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, width, D] with zeros on the left."""
    return F.pad(t, (0, 0, width - t.shape[2], 0))
