"""Seeded latent-interest event generator (vectorised NumPy; 5M events in a few seconds).

The world: items belong to interest clusters (which give them genres, a tag and a release
year) and have Zipf popularity; users hold ``interests_per_user`` clusters whose weights
drift over each user's lifetime. A history is a run of sessions (bursts of events a
minute or two apart, separated by gaps > 30 min); each session follows ONE interest
picked from the user's current weights, with some exploration of globally popular
items. History lengths follow a power law; the heaviest user reaches ``max_history``.
Values are ratings in [0.5, 5] in half steps, higher when the item's cluster is one of the
user's interests — so a model has something real to learn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from components.lake import FIRST_INDEX, items_table
from models.batch import NUM_GENRES

logger = logging.getLogger(__name__)

MIN_HISTORY = 5  # every user has at least this many events
EXPLORE_PROB = 0.15  # events drawn from global popularity instead of the interest
T0_S = 1_483_228_800  # 2017-01-01: all histories start within [T0, T0 + 3 years)
WINDOW_S = 3 * 365 * 86_400
SESSION_GAP_S = 1800  # sessions are separated by more than this (DATA features.session_gap_s)
IN_SESSION_GAP_MAX_S = 1500  # ...and events inside a session are closer than this


@dataclass(frozen=True)
class SyntheticConfig:
    """Seeded latent-interest generator (Zipf items, drifting interests, sessions).

    The ``ingest.synthetic`` section of the pipeline config (pipelines/config.py).
    """

    seed: int = 0
    num_events: int = 200_000
    num_users: int = 2_000
    num_items: int = 20_000
    num_interests: int = 32
    interests_per_user: int = 4
    zipf_exponent: float = 1.1
    # Per-user history length follows a power law; heavy users reach max_history.
    history_alpha: float = 1.3
    max_history: int = 12_000
    mean_session_len: float = 12.0


@dataclass(frozen=True)
class SyntheticWorld:
    """The latent structure behind the events (tests use it as ground truth)."""

    item_ids: np.ndarray  # (I,) int64 raw ids
    item_cluster: np.ndarray  # (I,) int32 interest cluster
    item_pop: np.ndarray  # (I,) float64, sums to 1 (Zipf)
    item_genre_mask: np.ndarray  # (I,) int32
    item_year: np.ndarray  # (I,) int16
    user_ids: np.ndarray  # (U,) int64 raw ids
    user_interests: np.ndarray  # (U, K) int32 cluster ids, distinct per user
    history_len: np.ndarray  # (U,) int64, sums to num_events


def _check(cfg: SyntheticConfig) -> None:
    if cfg.num_users < 1:  # checked first: the event-count check below would blame num_events
        raise ValueError(f"synthetic.num_users must be >= 1, got {cfg.num_users}")
    if cfg.num_items < cfg.num_interests:
        raise ValueError(
            f"synthetic.num_items ({cfg.num_items}) must be >= synthetic.num_interests ({cfg.num_interests})"
        )
    if not 1 <= cfg.interests_per_user <= cfg.num_interests:
        raise ValueError(
            f"synthetic.interests_per_user ({cfg.interests_per_user}) must be in [1, num_interests={cfg.num_interests}]"
        )
    need = cfg.max_history + (cfg.num_users - 1) * MIN_HISTORY
    if cfg.num_events < need:
        raise ValueError(
            f"synthetic.num_events ({cfg.num_events}) must be >= max_history + {MIN_HISTORY} per other user = {need}"
        )
    if cfg.num_events > cfg.num_users * cfg.max_history:
        raise ValueError(
            f"synthetic.num_events ({cfg.num_events}) exceeds num_users x "
            f"max_history = {cfg.num_users * cfg.max_history}"
        )
    if cfg.history_alpha <= 0 or cfg.zipf_exponent <= 0 or cfg.mean_session_len < 1:
        raise ValueError("synthetic.history_alpha and zipf_exponent must be > 0 and mean_session_len >= 1")


def history_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Power-law (Pareto ``history_alpha``) lengths summing to num_events; user 0 gets max_history."""
    others = cfg.num_users - 1
    lengths = np.zeros(cfg.num_users, dtype=np.float64)
    lengths[0] = cfg.max_history
    if others:
        weight = (1.0 - rng.random(others)) ** (-1.0 / cfg.history_alpha)
        spare = cfg.num_events - cfg.max_history - others * MIN_HISTORY
        alloc = MIN_HISTORY + spare * weight / weight.sum()
        # Clip at max_history and hand the excess to the unclipped users; converges fast.
        for _ in range(50):
            over = alloc > cfg.max_history
            excess = float((alloc[over] - cfg.max_history).sum())
            if excess < 1e-6:
                break
            alloc[over] = cfg.max_history
            free = ~over & (alloc < cfg.max_history)
            alloc[free] += excess * weight[free] / weight[free].sum()
        lengths[1:] = alloc
    ints = np.floor(lengths).astype(np.int64)
    short = cfg.num_events - int(ints.sum())
    room = np.flatnonzero(ints < cfg.max_history)
    top_frac = room[np.argsort(-(lengths - ints)[room], kind="stable")[:short]]
    ints[top_frac] += 1  # largest remainders: the total is exact
    return ints


def build_world(cfg: SyntheticConfig) -> SyntheticWorld:
    """Items, users, interests and history lengths, all determined by ``cfg.seed``."""
    _check(cfg)
    rng = np.random.default_rng([cfg.seed, 0])
    n_items, n_clusters = cfg.num_items, cfg.num_interests
    cluster = rng.permutation(np.arange(n_items) % n_clusters).astype(np.int32)
    pop = np.empty(n_items)
    pop[rng.permutation(n_items)] = 1.0 / np.arange(1, n_items + 1) ** cfg.zipf_exponent
    pop /= pop.sum()
    primary = rng.permutation(np.arange(n_clusters) % NUM_GENRES)
    secondary = rng.integers(0, NUM_GENRES, n_clusters)
    genre = (
        (1 << primary[cluster])
        | np.where(rng.random(n_items) < 0.5, 1 << secondary[cluster], 0)
        | np.where(rng.random(n_items) < 0.1, 1 << rng.integers(0, NUM_GENRES, n_items), 0)
    )
    cluster_year = rng.integers(1950, 2021, n_clusters)
    year = np.clip(np.rint(cluster_year[cluster] + rng.normal(0, 6, n_items)), 1920, 2024)
    n_users = cfg.num_users
    # K distinct clusters per user: the first K of a random permutation of all clusters.
    interests = np.argsort(rng.random((n_users, n_clusters)), axis=1)[:, : cfg.interests_per_user]
    return SyntheticWorld(
        item_ids=np.arange(1, n_items + 1, dtype=np.int64),
        item_cluster=cluster,
        item_pop=pop,
        item_genre_mask=genre.astype(np.int32),
        item_year=year.astype(np.int16),
        user_ids=(rng.permutation(n_users) + 1).astype(np.int64),
        user_interests=interests.astype(np.int32),
        history_len=history_lengths(cfg, rng),
    )


def generate_items(cfg: SyntheticConfig, world: SyntheticWorld | None = None) -> pa.Table:
    """The items table (docs/DATA.md schema); tag = the item's cluster (tag index 2 + cluster)."""
    world = build_world(cfg) if world is None else world
    tags = pa.ListArray.from_arrays(
        np.arange(len(world.item_ids) + 1, dtype=np.int32),
        pa.array(world.item_cluster + FIRST_INDEX, pa.int32()),
    )
    return items_table(world.item_ids, world.item_genre_mask, world.item_year, tags)


def _session_clusters(cfg, world, rng, user_e, progress, is_start) -> np.ndarray:
    """Interest cluster of each session: Gumbel-max over drifting per-user logits."""
    n_users, k = world.user_interests.shape
    base = rng.normal(0.0, 1.0, (n_users, k))
    drift = rng.normal(0.0, 2.0, (n_users, k))  # interests rise and fade over a lifetime
    s_user, s_prog = user_e[is_start], progress[is_start]
    logits = base[s_user] + drift[s_user] * s_prog[:, None]  # (S, K)
    logits += rng.gumbel(size=logits.shape)
    return world.user_interests[s_user, np.argmax(logits, axis=1)]


def _pick_items(world, rng, cluster_e) -> np.ndarray:
    """Item index per event: Zipf within the event's cluster, or global popularity when exploring."""
    n_items = len(world.item_ids)
    order = np.argsort(world.item_cluster, kind="stable")
    sorted_cluster = world.item_cluster[order]
    pop = world.item_pop[order]
    cluster_total = np.bincount(sorted_cluster, weights=pop)
    # Concatenated per-cluster CDFs: cluster c spans (c, c+1], so one searchsorted serves all.
    within = np.cumsum(pop) - np.concatenate([[0.0], np.cumsum(cluster_total)[:-1]])[sorted_cluster]
    cdf = sorted_cluster + within / cluster_total[sorted_cluster]
    last = np.r_[sorted_cluster[1:] != sorted_cluster[:-1], True]
    cdf[last] = sorted_cluster[last] + 1.0
    draw = cluster_e + rng.random(len(cluster_e))
    local = order[np.minimum(np.searchsorted(cdf, draw, side="right"), n_items - 1)]
    global_cdf = np.cumsum(world.item_pop)
    explore = rng.random(len(cluster_e)) < EXPLORE_PROB
    picked = np.searchsorted(global_cdf, rng.random(int(explore.sum())) * global_cdf[-1], side="right")
    local[explore] = np.minimum(picked, n_items - 1)
    return local


def _timestamps(cfg, world, rng, user_e, starts, is_start) -> np.ndarray:
    """Seconds since epoch: short in-session gaps, > 30 min between sessions, per-user span."""
    n_users = len(world.history_len)
    span = rng.uniform(90 * 86_400, WINDOW_S, n_users)
    begin = T0_S + rng.uniform(0, 1, n_users) * (WINDOW_S - span)
    n = len(user_e)
    within = np.floor(np.minimum(10 + rng.exponential(120.0, n), IN_SESSION_GAP_MAX_S))
    within[is_start] = 0.0
    idle = rng.exponential(1.0, n) * is_start
    idle[starts] = 0.0
    # Scale each user's idle time between sessions so the history ends at begin + span.
    n_between = np.bincount(user_e, weights=is_start, minlength=n_users) - 1
    left = span - np.bincount(user_e, weights=within, minlength=n_users) - n_between * (SESSION_GAP_S + 1)
    scale = np.maximum(left, 0.0) / np.maximum(np.bincount(user_e, weights=idle, minlength=n_users), 1e-9)
    between = (SESSION_GAP_S + 1 + np.floor(idle * scale[user_e])) * is_start
    gap = (within + between).astype(np.int64)
    gap[starts] = 0
    offset = np.cumsum(gap)
    return begin.astype(np.int64)[user_e] + offset - offset[starts][user_e]


def generate_events(cfg: SyntheticConfig, world: SyntheticWorld | None = None) -> pa.Table:
    """Events (user_id, item_id, ts int64 s, value float32), by user then time."""
    world = build_world(cfg) if world is None else world
    rng = np.random.default_rng([cfg.seed, 1])
    n_users = len(world.user_ids)
    user_e = np.repeat(np.arange(n_users), world.history_len)  # (E,)
    starts = np.concatenate([[0], np.cumsum(world.history_len)[:-1]])
    pos = np.arange(len(user_e)) - starts[user_e]
    progress = pos / world.history_len[user_e]
    is_start = (pos == 0) | (rng.random(len(user_e)) < 1.0 / cfg.mean_session_len)
    session = np.cumsum(is_start) - 1
    cluster_e = _session_clusters(cfg, world, rng, user_e, progress, is_start)[session]
    item_e = _pick_items(world, rng, cluster_e)
    in_interest = (world.user_interests[user_e] == world.item_cluster[item_e][:, None]).any(axis=1)
    user_bias = rng.normal(0.0, 0.35, n_users)
    item_quality = rng.normal(0.0, 0.35, len(world.item_ids))
    raw = 2.4 + 1.4 * in_interest + user_bias[user_e] + item_quality[item_e] + rng.normal(0.0, 0.6, len(user_e))
    value = np.clip(np.rint(raw * 2.0) / 2.0, 0.5, 5.0).astype(np.float32)
    ts = _timestamps(cfg, world, rng, user_e, starts, is_start)
    return pa.table(
        {
            "user_id": world.user_ids[user_e],
            "item_id": world.item_ids[item_e],
            "ts": ts,
            "value": value,
        }
    )
