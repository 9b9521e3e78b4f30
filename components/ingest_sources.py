"""Readers of the ingest stage's inputs: MovieLens, a generic events file, the generator.

Each reader returns a :class:`SourceData`: raw events coerced to (user_id, item_id, ts,
value) with nulls where a cell could not be parsed — row validation happens later, in one
place (components/validation.py) — plus item attributes and extra user ids. File-level
problems raise ``InputFileError`` naming the file and the column (components/input_files.py).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.config_loader import ConfigError
from components.input_files import read_file, require_columns
from components.lake import FIRST_INDEX
from components.synthetic import SyntheticConfig, build_world, generate_events, generate_items
from components.validation import InputFileError, coerce_ids, coerce_ts, coerce_values, raw_events
from models.batch import NUM_GENRES

logger = logging.getLogger(__name__)

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
NO_GENRE = "(no genres listed)"  # MovieLens' placeholder: no genre bit at all
ITEM_ATTR_COLUMNS = ("item_id", "title", "genre_mask", "year", "tag_ids")


@dataclass(frozen=True)
class EventsFileConfig:
    """A user's own behaviour log (CSV or Parquet) and how its columns map to ours.

    The ``ingest.events`` section of the pipeline config (pipelines/config.py).
    """

    path: str | None = None
    format: Literal["auto", "csv", "parquet"] = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    ts_col: str = "timestamp"
    value_col: str | None = "value"
    # How timestamps are given: integer seconds/milliseconds since epoch, or ISO-8601 text.
    ts_unit: Literal["s", "ms", "iso"] = "s"
    items_path: str | None = None
    item_id_col: str = "item_id"
    item_genres_col: str | None = "genres"
    item_year_col: str | None = "year"
    item_title_col: str | None = None
    users_path: str | None = None
    user_id_col: str = "user_id"


@dataclass(frozen=True)
class SourceData:
    """What a reader produced; validated and turned into lake tables by pipelines/ingest."""

    name: str  # for messages: the events file, or "synthetic"
    events: pa.Table  # user_id int64, item_id int64, ts int64 (s), value float (nullable)
    items: pa.Table  # ITEM_ATTR_COLUMNS (item_idx is assigned at write time)
    user_ids: np.ndarray | None = None  # users known beyond the events (a users file)
    metadata: dict[str, str] = field(default_factory=dict)  # stored with the items commit
    ts_unit: str | None = None  # the user's numeric ingest.events.ts_unit; None when the source fixes it


def _strict_ids(values: pa.ChunkedArray, path: str, column: str) -> np.ndarray:
    """Ids of an items/users file: every row must hold a valid id (the file is a dimension)."""
    parsed = coerce_ids(values, path, column)
    ids = parsed.values
    bad = pc.or_kleene(pc.is_null(ids), pc.less(ids, 0)).fill_null(True).to_numpy(zero_copy_only=False)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputFileError(
            path,
            f"{int(bad.sum())} missing/negative/non-integer/too large ids "
            f"(first at data row {row + 1}: {values[row].as_py()!r})",
            column,
        )
    return ids.to_numpy()


# ---------------------------------------------------------------- item attributes


def genre_masks(genres_text: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """ "A|B|C" text per item -> (int32 bit masks, genre vocabulary by frequency, <= NUM_GENRES)."""
    if isinstance(genres_text, pa.ChunkedArray):
        genres_text = genres_text.combine_chunks()
    text = pc.fill_null(genres_text, "")
    lists = pc.split_pattern(text, "|")
    flat = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    parent = pc.list_parent_indices(lists).to_numpy()
    keep = pc.and_(pc.greater(pc.utf8_length(flat), 0), pc.not_equal(flat, NO_GENRE))
    flat, parent = flat.filter(keep), parent[keep.to_numpy(zero_copy_only=False)]
    counts = pc.value_counts(flat)
    names, freq = counts.field("values").to_pylist(), counts.field("counts").to_numpy()
    ranked = sorted(zip(names, freq), key=lambda nf: (-nf[1], nf[0]))
    if len(ranked) > NUM_GENRES:
        logger.warning(
            "%d genres; keeping the %d most frequent, dropping %s",
            len(ranked),
            NUM_GENRES,
            [n for n, _ in ranked[NUM_GENRES:]],
        )
    vocab = [name for name, _ in ranked[:NUM_GENRES]]
    bit = pc.index_in(flat, pa.array(vocab, pa.string()))
    known = pc.is_valid(bit).to_numpy(zero_copy_only=False)
    mask = np.zeros(len(text), dtype=np.int32)
    np.bitwise_or.at(mask, parent[known], (1 << bit.filter(known).to_numpy()).astype(np.int32))
    return mask, vocab


def title_years(titles: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Release year from a MovieLens title "Name (1995)" (or "(2006-2007)"); 0 when absent."""
    found = pc.extract_regex(pc.fill_null(titles, ""), r"\((?P<year>\d{4})(?:[-–]\d{4})?\)\s*$")
    years = pc.cast(pc.struct_field(found, "year"), pa.int64()).fill_null(0)
    return years.to_numpy().astype(np.int16)


def top_tags(
    tag_item: np.ndarray,
    tag_text: pa.ChunkedArray | pa.Array,
    item_ids: np.ndarray,
    tags_per_item: int,
    max_vocab: int,
) -> tuple[pa.ListArray, int]:
    """Per item of ``item_ids``: its ``tags_per_item`` most frequent tags as vocabulary indices.

    Vocabulary: normalised (trimmed, lower-case) tags by global frequency, indices from 2
    (0 pad, 1 OOV), at most ``max_vocab``. Returns (list<int32> aligned to item_ids, vocab size).
    """
    norm = pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(tag_text, "")))
    tags = pa.table({"item": tag_item, "tag": norm}).filter(pc.greater(pc.utf8_length(norm), 0))
    counts = (
        tags.group_by("tag")
        .aggregate([("tag", "count")])
        .sort_by([("tag_count", "descending"), ("tag", "ascending")])
        .slice(0, max_vocab)
    )
    idx = pc.index_in(tags["tag"], counts["tag"])
    tags = tags.append_column("tag_idx", pc.add(idx, FIRST_INDEX)).filter(pc.is_valid(idx))
    per = (
        tags.group_by(["item", "tag_idx"])
        .aggregate([("tag_idx", "count")])
        .sort_by([("item", "ascending"), ("tag_idx_count", "descending"), ("tag_idx", "ascending")])
    )
    item = per["item"].to_numpy()
    tag_idx = per["tag_idx"].to_numpy().astype(np.int32)
    first = np.searchsorted(item, item, side="left")
    keep = (np.arange(len(item)) - first) < tags_per_item  # rank within the item
    item, tag_idx = item[keep], tag_idx[keep]
    lo = np.searchsorted(item, item_ids, side="left")
    hi = np.searchsorted(item, item_ids, side="right")
    lengths = hi - lo
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    take = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(offsets, pa.array(tag_idx[take], pa.int32())), counts.num_rows


def _item_attrs(item_id, title, genre_mask, year, tag_ids=None) -> pa.Table:
    n = len(item_id)
    if tag_ids is None:
        tag_ids = pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], pa.int32()))
    return pa.table(
        {
            "item_id": pa.array(item_id, pa.int64()),
            "title": pa.nulls(n, pa.string()) if title is None else pa.array(title, pa.string()),
            "genre_mask": pa.array(genre_mask, pa.int32()),
            "year": pa.array(year, pa.int16()),
            "tag_ids": tag_ids,
        }
    )


# ---------------------------------------------------------------- sources


def resolve_movielens_dir(movielens_dir: str, download_if_missing: bool, download_dir: str) -> Path:
    """The MovieLens folder; downloaded (ml-latest-small.zip) into ``download_dir`` when absent."""
    folder = Path(movielens_dir).expanduser()
    if (folder / "ratings.csv").is_file():
        return folder
    if not download_if_missing:
        raise InputFileError(
            str(folder / "ratings.csv"),
            "MovieLens folder not found; set ingest.movielens_dir or ingest.download_if_missing=true",
        )
    cache = Path(download_dir).expanduser()
    target = cache / "ml-latest-small"
    if (target / "ratings.csv").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / "ml-latest-small.zip.part"
    logger.info("MovieLens not at %s; downloading %s into %s", folder, MOVIELENS_URL, cache)
    try:
        urllib.request.urlretrieve(MOVIELENS_URL, partial)  # noqa: S310 (fixed https URL)
        with zipfile.ZipFile(partial) as archive:
            archive.extractall(cache)  # the archive holds one folder, ml-latest-small/
    except (urllib.error.URLError, OSError, zipfile.BadZipFile) as exc:
        raise InputFileError(str(folder), f"not found, and downloading {MOVIELENS_URL} failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def read_movielens(folder: Path, tags_per_item: int, max_tag_vocab: int) -> SourceData:
    """ratings.csv -> events (value = rating); movies.csv + tags.csv -> item attributes."""
    path = str(folder / "ratings.csv")
    ratings = read_file(path, "csv", text_columns=("rating", "timestamp"), id_columns=("userId", "movieId"))
    require_columns(ratings, dict.fromkeys(["userId", "movieId", "rating", "timestamp"]), path)
    events = raw_events(
        coerce_ids(ratings["userId"], path, "userId"),
        coerce_ids(ratings["movieId"], path, "movieId"),
        coerce_ts(ratings["timestamp"], "s", path, "timestamp"),
        coerce_values(ratings["rating"], path, "rating"),
    )
    mpath = str(folder / "movies.csv")
    movies = read_file(mpath, "csv", id_columns=("movieId",))
    require_columns(movies, dict.fromkeys(["movieId", "title", "genres"]), mpath)
    item_id = _strict_ids(movies["movieId"], mpath, "movieId")
    mask, genres = genre_masks(movies["genres"])
    tag_ids, n_tags = None, 0
    tpath = folder / "tags.csv"
    if tpath.is_file():
        tags = read_file(tpath, "csv", id_columns=("movieId",))
        require_columns(tags, dict.fromkeys(["movieId", "tag"]), str(tpath))
        tag_item = _strict_ids(tags["movieId"], str(tpath), "movieId")
        tag_ids, n_tags = top_tags(tag_item, pc.cast(tags["tag"], pa.string()), item_id, tags_per_item, max_tag_vocab)
    items = _item_attrs(
        item_id,
        pc.cast(movies["title"], pa.string()),
        mask,
        title_years(pc.cast(movies["title"], pa.string())),
        tag_ids,
    )
    meta = {"genres": "|".join(genres), "num_tags": str(n_tags)}
    return SourceData(name=path, events=events, items=items, metadata=meta)


def _read_items_file(cfg: EventsFileConfig) -> tuple[pa.Table | None, dict[str, str]]:
    if cfg.items_path is None:
        return None, {}
    path = cfg.items_path
    table = read_file(path, id_columns=(cfg.item_id_col,))
    key = "ingest.events."
    require_columns(
        table,
        {
            cfg.item_id_col: key + "item_id_col",
            cfg.item_genres_col: key + "item_genres_col",
            cfg.item_year_col: key + "item_year_col",
            cfg.item_title_col: key + "item_title_col",
        },
        path,
    )
    n = table.num_rows
    item_id = _strict_ids(table[cfg.item_id_col], path, cfg.item_id_col)
    if len(np.unique(item_id)) != n:
        raise InputFileError(path, "duplicate item ids", cfg.item_id_col)
    mask, genres = np.zeros(n, np.int32), []
    if cfg.item_genres_col is not None:
        column = table[cfg.item_genres_col]
        if not (
            pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)
        ):
            raise InputFileError(path, f"expected '|'-separated text, got {column.type}", cfg.item_genres_col)
        mask, genres = genre_masks(pc.cast(column, pa.string()))
    year = np.zeros(n, np.int16)
    if cfg.item_year_col is not None:
        raw = coerce_ids(table[cfg.item_year_col], path, cfg.item_year_col).values.fill_null(0).to_numpy()
        year = np.where((raw > 0) & (raw < 10_000), raw, 0).astype(np.int16)
    title = None
    if cfg.item_title_col is not None:
        title = pc.cast(table[cfg.item_title_col], pa.string())
    return _item_attrs(item_id, title, mask, year), {"genres": "|".join(genres), "num_tags": "0"}


def read_events_source(cfg: EventsFileConfig) -> SourceData:
    """A generic events file (CSV/Parquet) mapped by ``cfg``, plus optional items/users files."""
    if cfg.path is None:
        raise InputFileError("<ingest.events.path>", "no events file configured; set --ingest.events.path=FILE")
    path = cfg.path
    mapped = [cfg.ts_col, cfg.value_col]
    table = read_file(
        path, cfg.format, text_columns=[c for c in mapped if c is not None], id_columns=(cfg.user_col, cfg.item_col)
    )
    key = "ingest.events."
    require_columns(
        table,
        {
            cfg.user_col: key + "user_col",
            cfg.item_col: key + "item_col",
            cfg.ts_col: key + "ts_col",
            cfg.value_col: key + "value_col",
        },
        path,
    )
    n = table.num_rows
    value = (
        coerce_values(table[cfg.value_col], path, cfg.value_col) if cfg.value_col is not None else pa.array(np.ones(n))
    )
    events = raw_events(
        coerce_ids(table[cfg.user_col], path, cfg.user_col),
        coerce_ids(table[cfg.item_col], path, cfg.item_col),
        coerce_ts(table[cfg.ts_col], cfg.ts_unit, path, cfg.ts_col),
        value,
    )
    items, meta = _read_items_file(cfg)
    if items is None:
        items = _item_attrs(np.zeros(0, np.int64), None, np.zeros(0, np.int32), np.zeros(0, np.int16))
    user_ids = None
    if cfg.users_path is not None:
        users = read_file(cfg.users_path, id_columns=(cfg.user_id_col,))
        require_columns(users, {cfg.user_id_col: "ingest.events.user_id_col"}, cfg.users_path)
        user_ids = _strict_ids(users[cfg.user_id_col], cfg.users_path, cfg.user_id_col)
    ts_unit = cfg.ts_unit if cfg.ts_unit in ("s", "ms") else None
    return SourceData(name=path, events=events, items=items, user_ids=user_ids, metadata=meta, ts_unit=ts_unit)


def read_synthetic(cfg: SyntheticConfig) -> SourceData:
    """The seeded generator's events and items (see components/synthetic.py)."""
    try:
        world = build_world(cfg)
    except ValueError as exc:
        raise ConfigError(f"ingest.{exc}") from exc
    items = generate_items(cfg, world).select(list(ITEM_ATTR_COLUMNS))
    meta = {"genres": "|".join(f"g{g:02d}" for g in range(NUM_GENRES)), "num_tags": str(cfg.num_interests)}
    return SourceData(name="synthetic", events=generate_events(cfg, world), items=items, metadata=meta)
