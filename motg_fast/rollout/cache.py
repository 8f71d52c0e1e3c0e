"""A preallocated KV cache for HF causal LMs whose rows can be shared by groups and compacted.

One buffer per layer for keys and one for values, `[rows, kv_heads, capacity, head_dim]`,
allocated once (at the first `update`, when heads, head size, dtype and device are known).
Unlike transformers' `StaticCache`, attention only sees the filled prefix
`[:, :, :length]` (a view, no copy), so a decode step reads `length` positions, not
`capacity`; unlike `DynamicCache`, nothing is reallocated while the sequence grows.

Group sharing: built with `group_size=G`, the cache holds `rows = B * G` rows, but the
prefill writes only rows `0, G, 2G, …` (one per prompt); `share_prefix()` then copies each
prompt's prefix into the other `G - 1` rows of its group (one broadcast copy, no prefill
compute). `keep_rows(indices)` compacts the batch in place when rows have finished: the
kept rows move to the front of the same buffers and later steps use a view of them.

Every layer is a plain attention layer (`full_attention` or `sliding_attention`; a sliding
layer keeps its whole history here and the model's mask applies the window).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values in preallocated buffers `[rows, heads, capacity, dim]`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int, rows: int, group_size: int = 1):
        super().__init__()
        self.capacity = capacity
        self.rows = rows
        self.group_size = group_size
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate both buffers from the first keys/values `[b, heads, q, dim]` (b = rows / G)."""
        if key_states.shape[0] * self.group_size != self.rows:
            raise ValueError(
                f"cache was built for {self.rows} rows in groups of {self.group_size}, but the "
                f"first update has {key_states.shape[0]} rows"
            )
        device = key_states.device
        # Under autocast, keys can arrive in float32 (rotary tables follow float32 inputs) while
        # values are in the autocast dtype: store both in the dtype attention will use.
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else value_states.dtype
        self.dtype, self.device = dtype, device
        shape = (self.rows, key_states.shape[1], self.capacity)
        self.keys = key_states.new_empty((*shape, key_states.shape[-1]), dtype=dtype)
        self.values = value_states.new_empty((*shape, value_states.shape[-1]), dtype=dtype)
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self.rows

    def _writable(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[:: self.group_size] if self.group_size > 1 else buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[b, heads, q, dim]` at `length … length+q`; return the filled prefix."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.length, self.length + key_states.shape[-2]
        if stop > self.capacity:
            raise RuntimeError(f"KV cache overflow: {stop} positions, capacity {self.capacity}")
        keys, values = self._writable(self.keys), self._writable(self.values)
        keys[:, :, start:stop].copy_(key_states)
        values[:, :, start:stop].copy_(value_states)
        self.length = stop
        return keys[:, :, :stop], values[:, :, :stop]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`(kv_length, kv_offset)` for a query of `query_length` (asked before `update`)."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def share_prefix(self) -> None:
        """Copy row `g*G` into rows `g*G+1 … g*G+G-1` (filled prefix); then every row writes."""
        if self.group_size > 1 and self.is_initialized:
            for buffer in (self.keys, self.values):
                grouped = buffer.view(-1, self.group_size, *buffer.shape[1:])
                grouped[:, 1:, :, : self.length] = grouped[:, :1, :, : self.length]
        self.group_size = 1

    def keep_rows(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (ascending int64) at the front of the buffers; drop the others."""
        if self.is_initialized:
            n = indices.numel()
            for name in ("keys", "values"):
                buffer = getattr(self, name)
                kept = buffer[:, :, : self.length].index_select(0, indices)
                buffer[:n, :, : self.length] = kept
                setattr(self, name, buffer[:n])
        self.rows = indices.numel()


class PreallocatedCache(Cache):
    """KV cache of `rows` rows and `capacity` positions per layer (see the module docstring).

    Args:
        config: the model config (its decoder config gives the layer count and types).
        rows: batch rows the decode loop runs (N = B * G with group sharing).
        capacity: positions per row (prompt + generated inputs).
        group_size: G; the prefill then feeds `rows / G` rows and `share_prefix()` fills
            the rest.
    """

    def __init__(self, config, *, rows: int, capacity: int, group_size: int = 1):
        if rows % group_size:
            raise ValueError(f"rows={rows} is not a multiple of group_size={group_size}")
        text_config = config.get_text_config(decoder=True)
        layer_types = check_layer_types(text_config)
        super().__init__(
            layers=[PreallocatedLayer(capacity, rows, group_size) for _ in layer_types]
        )

    @property
    def length(self) -> int:
        """Positions filled so far (the same in every layer)."""
        return self.layers[0].length

    def share_prefix(self) -> None:
        """After the prefill: copy each group's prefilled row into the group's other rows."""
        for layer in self.layers:
            layer.share_prefix()

    def keep_rows(self, indices: torch.Tensor) -> None:
        """Compact the batch to rows `indices` (ascending, on the cache's device)."""
        for layer in self.layers:
            layer.keep_rows(indices)


def check_layer_types(text_config) -> list[str]:
    """The decoder's layer types; raises for layers this cache cannot hold (linear attention)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:
        layer_types = ["full_attention"] * text_config.num_hidden_layers
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise NotImplementedError(
            f"the preallocated KV cache supports layer types {SUPPORTED_LAYER_TYPES}, but the "
            f"model has {unsupported}"
        )
    return list(layer_types)
