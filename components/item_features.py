"""Item side features by vocabulary index, and the vectorised id -> index dictionary.

Shared by the features stage (pipelines/features.py: candidates of training groups) and the
serving featurizer (serving/featurizer.py: candidates of a request), so a candidate gets the
same genre, year and tags at serving time as in training.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.transforms import OOV


def lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: int) -> np.ndarray:
    """``values[k]`` where ``sorted_keys[k] == query``, else ``default`` (vectorised dictionary).

    More queries than keys (a bucket's events against the catalogue) go through a hash table
    of the keys (``pc.index_in``: 614k events, 20k items: 2.4 ms against 50 ms bisecting);
    fewer (serving's candidates) bisect the sorted keys and build nothing.
    """
    if sorted_keys.size == 0:
        return np.full(len(query), default, dtype=values.dtype)
    query = np.asarray(query)
    if query.size > sorted_keys.size and query.dtype == sorted_keys.dtype:
        found = pc.index_in(pa.array(query), value_set=pa.array(sorted_keys))
        pos = pc.fill_null(found, -1).to_numpy()
        return np.where(pos >= 0, values[pos], default).astype(values.dtype)
    pos = np.minimum(np.searchsorted(sorted_keys, query), sorted_keys.size - 1)
    return np.where(sorted_keys[pos] == query, values[pos], default).astype(values.dtype)


def item_arrays(items: pa.Table, tags_per_item: int) -> dict[str, np.ndarray]:
    """Items table -> raw-id dictionary and side features indexed by item_idx."""
    items = items.sort_by("item_id")
    idx = items["item_idx"].to_numpy().astype(np.int64)
    size = int(idx.max(initial=OOV)) + 1
    genre = np.zeros(size, np.int32)
    genre[idx] = pc.fill_null(items["genre_mask"], 0).to_numpy()
    year = np.zeros(size, np.int16)
    year[idx] = pc.fill_null(items["year"], 0).to_numpy()
    tag_col = items["tag_ids"].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(tag_col), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(tag_col).to_numpy().astype(np.int32)
    row = np.repeat(np.arange(len(idx)), lengths)
    within = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    tags = np.zeros((size, tags_per_item), np.int32)
    keep = within < tags_per_item
    tags[idx[row[keep]], within[keep]] = flat[keep]
    return {
        "item_ids": items["item_id"].to_numpy(),
        "item_idx": idx.astype(np.int32),
        "genre_mask": genre,
        "year": year,
        "tags": tags,
    }
