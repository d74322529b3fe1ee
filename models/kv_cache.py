"""Key/value caches of the MED text transformer and the step-decoding protocol.

`ImageKV` holds the cross-attention keys and values of a batch of images, one pair per layer,
computed once per image. Text rows point at their image through `index`, so many texts (ITM
candidates, beams, samples) share one copy: when the rows are grouped evenly per image (the
`repeat_interleave` layout of beams and samples), the rows of one image are folded into the query
length and attend to the un-copied keys; otherwise the keys are gathered per row. `DecoderCache`
adds the self-attention keys and values of the tokens decoded so far; `models.med.TextDecoder`
implements `models.generation.StepDecoder` on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _even_group(index: Tensor, num_images: int) -> int | None:
    """K when index == [0]*K + [1]*K + ... + [num_images-1]*K, else None."""
    if num_images == 0 or index.numel() % num_images:
        return None
    k = index.numel() // num_images
    expected = torch.arange(num_images, device=index.device).repeat_interleave(k)
    return k if torch.equal(index, expected) else None


@dataclass(frozen=True)
class ImageKV:
    """Cross-attention keys/values per layer, stored once per image."""

    keys: tuple[Tensor, ...]  # per layer (B_img, h, N, dh)
    values: tuple[Tensor, ...]  # per layer (B_img, h, N, dh)
    index: Tensor | None = None  # (B,) text row -> image row; None: row b is image b
    group: int | None = 1  # K when rows are grouped evenly, K per image, in image order

    @staticmethod
    def build(keys: tuple[Tensor, ...], values: tuple[Tensor, ...], index: Tensor | None) -> ImageKV:
        """Attach a row -> image index (validated) and detect the even grouping."""
        num_images = keys[0].shape[0] if keys else 0
        if index is None:
            return ImageKV(keys, values, None, 1)
        index = index.to(device=keys[0].device if keys else index.device, dtype=torch.long)
        if index.dim() != 1:
            raise ValueError(f"image index must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_images):
            raise ValueError(f"image index out of range for {num_images} images")
        return ImageKV(keys, values, index, _even_group(index, num_images))

    @property
    def num_rows(self) -> int:
        """Text rows served (B)."""
        return self.keys[0].shape[0] if self.index is None else self.index.numel()

    def select(self, rows: Tensor) -> ImageKV:
        """Rows `rows` (B',) of the current rows.

        Beam reorders and the B -> B*K expansion keep the even grouping and copy nothing. When
        rows leave the batch, images no row uses are dropped; if the rows are then no longer
        grouped evenly, the keys are gathered per row once here rather than at every step.
        """
        rows = rows.to(device=self.keys[0].device, dtype=torch.long)
        new_index = rows if self.index is None else self.index[rows]
        used, remapped = torch.unique(new_index, sorted=True, return_inverse=True)
        keys, values = self.keys, self.values
        if used.numel() != keys[0].shape[0]:
            keys = tuple(k.index_select(0, used) for k in keys)
            values = tuple(v.index_select(0, used) for v in values)
            new_index = remapped
        selected = ImageKV.build(keys, values, new_index)
        if selected.group is not None:
            return selected
        return ImageKV(tuple(k.index_select(0, new_index) for k in keys),
                       tuple(v.index_select(0, new_index) for v in values), None, 1)

    def attend(self, layer: int, query: Tensor, dropout_p: float = 0.0) -> Tensor:
        """query (B, h, T, dh) -> (B, h, T, dh); images are never padded, so no mask."""
        key, value = self.keys[layer], self.values[layer]
        if self.index is None or self.group == 1:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)
        if self.group is not None:
            rows, heads, length, dh = query.shape
            n_img, k = key.shape[0], self.group
            folded = query.reshape(n_img, k, heads, length, dh).transpose(1, 2)  # (Bi, h, K, T, dh)
            folded = folded.reshape(n_img, heads, k * length, dh)
            out = F.scaled_dot_product_attention(folded, key, value, dropout_p=dropout_p)
            out = out.reshape(n_img, heads, k, length, dh).transpose(1, 2)  # (Bi, K, h, T, dh)
            return out.reshape(rows, heads, length, dh)
        assert self.index is not None
        return F.scaled_dot_product_attention(query, key[self.index], value[self.index], dropout_p=dropout_p)


@dataclass(frozen=True)
class DecoderCache:
    """Self-attention keys/values of the decoded prefix plus the image keys/values."""

    self_keys: tuple[Tensor, ...]  # per layer (B, h, t, dh)
    self_values: tuple[Tensor, ...]  # per layer (B, h, t, dh)
    image: ImageKV

    @property
    def length(self) -> int:
        """Tokens decoded so far (prompt included)."""
        return self.self_keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        """Rows (B)."""
        return self.self_keys[0].shape[0]

    def select(self, rows: Tensor) -> DecoderCache:
        """Keep/repeat rows (beam reorder, sample expansion)."""
        rows = rows.to(device=self.self_keys[0].device, dtype=torch.long)
        return DecoderCache(
            tuple(k.index_select(0, rows) for k in self.self_keys),
            tuple(v.index_select(0, rows) for v in self.self_values),
            self.image.select(rows),
        )
