"""A request is featurized exactly as training built the same group, and scored as offline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch

from components.bundle import load_bundle
from components.checkpoint import load_model
from components.collate import CollateConfig, collate_groups
from components.training_data import pin_training_data, train_counts
from components.transforms import OOV
from pipelines.config import FeaturesConfig
from serving.config import ServeConfig
from serving.featurizer import Featurizer
from serving.ranker_core import RankerCore
from serving.sequence_store import SequenceStore


def test_request_features_equal_the_training_group(small_lake, bundle_dir):
    bundle = load_bundle(bundle_dir)
    featurizer = Featurizer(bundle)
    store = SequenceStore.load(small_lake)
    data = pin_training_data(small_lake)
    rows = data.load_groups("test", bundle.manifest.max_seq_len).take(12)
    id_of = dict(zip(bundle.items["item_idx"].to_pylist(), bundle.items["item_id"].to_pylist()))
    checked = 0
    for row in rows:
        expected = collate_groups(
            pa.Table.from_pylist([row]), CollateConfig(max_seq_len=bundle.manifest.max_seq_len, with_labels=False)
        )
        candidates = np.array([id_of[i] for i in row["cand_item_idx"]], np.int64)
        history = featurizer.history(store, row["user_id"], row["request_ts"])
        got = featurizer.featurize(row["user_id"], candidates, row["request_ts"], history)
        assert not got.unknown_user and got.unknown_items == 0
        for field in dataclasses.fields(expected):
            want = getattr(expected, field.name)
            if want is not None:
                torch.testing.assert_close(getattr(got.batch, field.name), want, rtol=0, atol=0, msg=field.name)
        checked += 1
    assert checked == 12


def test_cached_user_side_scores_exactly_as_a_fresh_forward(small_lake, bundle_dir):
    bundle = load_bundle(bundle_dir)
    store = SequenceStore.load(small_lake)
    core = RankerCore(bundle, store, ServeConfig(profile_batches=6))
    user = int(store.user_ids[np.argmax(np.diff(store.offsets))])
    items = bundle.items["item_id"].to_pylist()[:7]
    first, hit_first = core.score_now(user, items, 1.9e9)
    second, hit_second = core.score_now(user, items[2:] + [10**12], 1.9e9)  # same user, other items
    assert (hit_first, hit_second) == (False, True)
    ts = core.quantise_ts(1.9e9)
    for scores, cands in ((first, items), (second, items[2:] + [10**12])):
        fz = core.featurizer.featurize(user, np.array(cands), ts, core.featurizer.history(store, user, ts))
        with torch.inference_mode():
            reference = torch.sigmoid(bundle.model(fz.batch).logits[0]).numpy()
        np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-5)
    assert core.stats.unknown_items == 1 and core.cache.stats.hits == 1


def test_new_sequences_version_invalidates_the_cache_but_not_requests_in_flight(small_lake, bundle_dir):
    bundle = load_bundle(bundle_dir)
    store = SequenceStore.load(small_lake)
    core = RankerCore(bundle, store, ServeConfig(profile_batches=6))
    user = int(store.user_ids[0])
    items = bundle.items["item_id"].to_pylist()[:3]
    core.score_now(user, items, 1.9e9)
    in_flight = core.make_request("r", user, items, 1e12, 0.0, 1.9e9)  # admitted before the swap
    newer = dataclasses.replace(store, version=store.version + 1)  # what a new features run loads as
    assert core.swap_store(newer) == 1 and len(core.cache) == 0
    assert in_flight.payload.key.sequence_version == store.version
    kept = store.history(user, in_flight.payload.request_ts, bundle.manifest.max_seq_len)  # the old version's
    assert in_flight.payload.history.item_idx.tolist() == kept.item_idx.tolist()
    after = core.make_request("s", user, items, 1e12, 0.0, 1.9e9)
    assert after.payload.key.sequence_version == store.version + 1 and not after.cached


def test_rare_ids_are_served_as_evaluation_scores_them(small_lake, trained, bundle_dir):
    """The bundle's vocabulary says which ids share the OOV row (train-period counts below
    features.min_item_count), and a replica scores a rare item exactly as evaluation does."""
    bundle = load_bundle(bundle_dir)
    evaluated, _ = load_model(trained[1])  # the model evaluation scores with
    counts = train_counts(pin_training_data(small_lake))
    idx = bundle.items["item_idx"].to_numpy()
    want = np.where(counts["item"][idx] >= FeaturesConfig().min_item_count, idx, OOV)
    np.testing.assert_array_equal(bundle.items["embedding_row"].to_numpy(), want)
    ids = bundle.items["item_id"].to_numpy()
    rare, common = ids[(want == OOV) & (idx != OOV)], ids[want != OOV]
    assert rare.size >= 2 and common.size >= 1  # the small lake has both
    store = SequenceStore.load(small_lake)
    core = RankerCore(bundle, store, ServeConfig(profile_batches=6))
    user = int(store.user_ids[0])
    candidates = [int(rare[0]), int(rare[1]), int(common[0])]
    served, _ = core.score_now(user, candidates, 1.9e9)
    ts = core.quantise_ts(1.9e9)
    fz = core.featurizer.featurize(user, np.array(candidates), ts, core.featurizer.history(store, user, ts))
    assert fz.rare_items == 2 and fz.unknown_items == 0 and core.stats.rare_items == 2
    with torch.inference_mode():
        offline = evaluated(fz.batch).logits[0]
        as_oov = dataclasses.replace(fz.batch, cand_item=fz.batch.cand_item.clone())
        as_oov.cand_item[0, :2] = OOV  # the rare items as the OOV id: the same row, the same logits
        oov_logits = evaluated(as_oov).logits[0]
    np.testing.assert_allclose(served, torch.sigmoid(offline).numpy(), rtol=0, atol=1e-5)
    torch.testing.assert_close(oov_logits, offline, rtol=0, atol=0)


def test_a_batch_of_requests_scores_in_one_call_exactly_as_each_alone(small_lake, bundle_dir):
    """One scheduler batch: users with long and short histories, a hit beside misses, one
    request in two chunks, candidate counts 1 to 9; one score_candidates call for all of it."""
    from components.slo_scheduler import Batch, BatchItem, batch_shape

    bundle = load_bundle(bundle_dir)
    store = SequenceStore.load(small_lake)
    core = RankerCore(bundle, store, ServeConfig(profile_batches=6))
    lengths = np.diff(store.offsets)
    long_user, short_user = int(store.user_ids[np.argmax(lengths)]), int(store.user_ids[np.argmin(lengths)])
    other = int(store.user_ids[len(store.user_ids) // 2])
    items = bundle.items["item_id"].to_pylist()
    core.score_now(other, items[:2], 1.9e9)  # other's user side is now cached: a hit below
    requests = [
        core.make_request("a", long_user, items[:9], 1e12, 0.0, 1.9e9),
        core.make_request("b", short_user, items[3:4], 1e12, 0.0, 1.9e9),
        core.make_request("c", other, items[5:10], 1e12, 0.0, 1.9e9),
    ]
    parts = (
        BatchItem(requests[0], 0, 4),
        BatchItem(requests[1], 0, 1),
        BatchItem(requests[2], 0, 5),
        BatchItem(requests[0], 4, 5),
    )
    calls = []
    score = bundle.model.score_candidates
    bundle.model.score_candidates = lambda *a, **k: calls.append(1) or score(*a, **k)
    try:
        core.run_batch(Batch(parts, batch_shape(parts), 0.0))
    finally:
        del bundle.model.score_candidates
    assert len(calls) == 1
    assert [r.payload.cache_hit for r in requests] == [False, False, True]
    alone = RankerCore(bundle, store, ServeConfig(profile_batches=6, cache=False))
    for request, cands in zip(requests, (items[:9], items[3:4], items[5:10])):
        want, _ = alone.score_now(request.user_id, cands, 1.9e9)
        np.testing.assert_allclose(request.payload.scores, want, rtol=0, atol=1e-5)


def test_the_cache_key_holds_the_request_time_quantised_to_its_window(small_lake, bundle_dir):
    """Requests in one serve.request_ts_granularity_s window share a user state; the next window
    (the gap features and the history cut move with the time) is a miss, scored afresh."""
    bundle = load_bundle(bundle_dir)
    store = SequenceStore.load(small_lake)
    core = RankerCore(bundle, store, ServeConfig(profile_batches=6, request_ts_granularity_s=60))
    user = int(store.user_ids[np.argmax(np.diff(store.offsets))])
    items = bundle.items["item_id"].to_pylist()[:4]
    start = 60 * 31_666_667  # a window's first second
    keys = [core.make_request(f"k{dt}", user, items, 1e12, 0.0, start + dt).payload.key for dt in (0, 59, 60, -1)]
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
    assert [k.request_ts for k in keys] == [start, start, start + 60, start - 60]
    hits = [core.score_now(user, items, start + dt)[1] for dt in (0, 59, 60, 119)]
    assert hits == [False, True, False, True]
    later, _ = core.score_now(user, items, start + 60)
    fresh, _ = RankerCore(bundle, store, ServeConfig(profile_batches=6, cache=False)).score_now(user, items, start + 60)
    np.testing.assert_allclose(later, fresh, rtol=0, atol=1e-5)


def test_an_moe_bundle_is_served_in_eval_mode_as_evaluation_scores_it(small_lake, bundle_dir, tmp_path):
    """RankMixer-MoE routes with a different router in training and in inference, so a replica
    whose model were left in training mode would score differently from evaluation: the served
    scores must equal the eval-mode forward, and differ from the train-mode one."""
    from components.bundle import write_bundle
    from components.config_loader import from_dict, to_dict
    from models.variants import ModelConfig, build_model

    base = load_bundle(bundle_dir)
    config = from_dict(ModelConfig, {**base.manifest.model, "variant": "rankmixer_moe"}, "model")
    torch.manual_seed(0)
    model = build_model(config)
    manifest = base.manifest
    write_bundle(
        str(tmp_path / "moe"),
        model,
        variant="rankmixer_moe",
        model_config=to_dict(config),
        max_seq_len=manifest.max_seq_len,
        tags_per_item=manifest.tags_per_item,
        items=base.items,
        users=base.users,
        lake=manifest.lake,
        checkpoint=manifest.checkpoint,
    )
    bundle = load_bundle(str(tmp_path / "moe"))
    assert not any(m.training for m in bundle.model.modules())
    store = SequenceStore.load(small_lake)
    core = RankerCore(bundle, store, ServeConfig(profile_batches=6))
    user = int(store.user_ids[np.argmax(np.diff(store.offsets))])
    items = bundle.items["item_id"].to_pylist()[:12]
    served, _ = core.score_now(user, items, 1.9e9)
    ts = core.quantise_ts(1.9e9)
    fz = core.featurizer.featurize(user, np.array(items), ts, core.featurizer.history(store, user, ts))
    with torch.inference_mode():
        evaluated = torch.sigmoid(model.eval()(fz.batch).logits[0]).numpy()
        in_training = torch.sigmoid(model.train()(fz.batch).logits[0]).numpy()
    model.eval()
    np.testing.assert_allclose(served, evaluated, rtol=0, atol=1e-5)
    assert np.abs(in_training - evaluated).max() > 1e-4  # the two routers differ: the check can fail


def test_prewarm_caches_recent_users_for_this_and_the_next_window_exactly_as_a_miss(small_lake, bundle_dir):
    """Pre-warm computes, off the request path, the state a returning user's request would miss:
    its scores then equal a cache-less replica's; it follows a new sequences version."""
    bundle = load_bundle(bundle_dir)
    store = SequenceStore.load(small_lake)
    config = ServeConfig(profile_batches=6, request_ts_granularity_s=60, prewarm_lead_s=10.0, prewarm_users=2)
    core = RankerCore(bundle, store, config)
    assert core.prewarm_next(1.9e9) is None  # the profiling sweep's users are not traffic
    order = np.argsort(np.diff(store.offsets))
    users = [int(store.user_ids[order[-1]]), int(store.user_ids[order[-2]]), int(store.user_ids[order[0]])]
    items = bundle.items["item_id"].to_pylist()[:5]
    start = 60 * 31_666_667
    for user in users:  # three users seen; the bound keeps the two newest
        core.score_now(user, items, start + 5)
    assert core.prewarm_next(start + 5) is None  # all warm for this window, the next is 55 s off
    # 10 s before the next window: the newest user first, for the next window.
    assert core.prewarm_next(start + 50) == (users[2], start + 60)
    assert core.prewarm(users[2], start + 60) and not core.prewarm(users[2], start + 60)
    assert core.prewarm_next(start + 50) == (users[1], start + 60)
    assert core.prewarm(users[1], start + 60) and core.prewarm_next(start + 50) is None  # users[0] fell out
    assert core.stats.prewarmed == 2
    scores, hit = core.score_now(users[1], items, start + 61)
    fresh = RankerCore(bundle, store, dataclasses.replace(config, cache=False))
    want, _ = fresh.score_now(users[1], items, start + 61)
    assert hit and np.allclose(scores, want, rtol=0, atol=1e-5)
    # A new sequences version drops the states: the recent users are warmed again, for it.
    core.swap_store(dataclasses.replace(store, version=store.version + 1))
    assert core.prewarm_next(start + 61) == (users[1], start + 60)
    # Never at the cost of an eviction: with room for one state only, the next window waits.
    small = RankerCore(bundle, store, config)
    small.score_now(users[0], items, start + 5)
    assert small.prewarm_next(start + 50) == (users[0], start + 60)
    small.cache.max_bytes = int(1.5 * small.cache.stats.bytes)
    assert small.prewarm_next(start + 50) is None
    # Off: nothing is remembered, nothing proposed.
    off = RankerCore(bundle, store, dataclasses.replace(config, prewarm_users=0))
    off.score_now(users[0], items, start)
    assert off.prewarm_next(start + 50) is None
