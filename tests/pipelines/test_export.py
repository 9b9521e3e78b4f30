"""pipelines.export: a checkpoint becomes a self-contained serving bundle that loads back to the
same model, and every damaged or mismatched piece is named on load."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from components.bundle import ITEMS, MANIFEST, WEIGHTS, WEIGHTS_W8A16, BundleError, load_bundle
from components.checkpoint import load_model
from pipelines.export import main
from tests.models import ranker_factories as rf
from tests.small_runs import train_args


@pytest.fixture(scope="module")
def bundle(small_lake, trained, tmp_path_factory) -> str:
    storage, checkpoint = trained
    out = str(tmp_path_factory.mktemp("bundles") / "b")
    args = train_args(small_lake, storage, f"--export.checkpoint={checkpoint}", f"--export.output={out}")
    assert main([*args, "--export.w8a16=true"]) == 0
    return out


def _batch(meta, seed: int):
    sizes = meta.model["ranker"]["sparse"]
    return rf.random_groups(
        seed=seed,
        batch=3,
        cands=5,
        seq=20,
        num_items=sizes["item_vocab"],
        num_users=sizes["user_vocab"],
        num_tags=sizes["tag_vocab"],
    )


def _copy(bundle: str, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(bundle, target)
    return target


def test_bundle_scores_exactly_as_the_checkpoint(bundle, trained, capsys):
    model, meta = load_model(trained[1])
    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    assert manifest.variant == meta.variant and manifest.checkpoint == {"path": trained[1], "step": meta.step}
    assert manifest.lake["samples_version"] == meta.samples_version and manifest.max_seq_len == 32
    assert {"items_version", "users_version"} <= set(manifest.lake)
    assert len(manifest.model_version) == 16
    batch = _batch(meta, 0)
    torch.testing.assert_close(loaded.model(batch).logits, model(batch).logits, rtol=0, atol=0)
    # Items and users: every id of the lake's pinned versions, with its index.
    items = loaded.items.to_pydict()
    assert len(set(items["item_id"])) == len(items["item_id"]) and min(items["item_idx"]) >= 2


def test_w8a16_weights_load_and_stay_close(bundle, trained):
    model, meta = load_model(trained[1])
    quantized = load_bundle(bundle, w8a16=True)
    assert quantized.quantized and quantized.model_version.endswith("-w8a16")
    sizes = quantized.manifest.files
    assert sizes[WEIGHTS_W8A16]["bytes"] < sizes[WEIGHTS]["bytes"]
    batch = _batch(meta, 1)
    ref, q = model(batch).logits, quantized.model(batch).logits
    assert (q - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_same_checkpoint_same_model_version(bundle, small_lake, trained, tmp_path):
    storage, checkpoint = trained
    out = str(tmp_path / "again")
    args = train_args(small_lake, storage, f"--export.checkpoint={checkpoint}", f"--export.output={out}")
    assert main([*args, "--export.w8a16=true"]) == 0
    assert load_bundle(out).model_version == load_bundle(bundle).model_version


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: os.remove(os.path.join(d, ITEMS)), "is missing items.parquet"),
        (lambda d: os.truncate(os.path.join(d, WEIGHTS), 1000), "bytes, bundle.json says"),
        (lambda d: os.remove(os.path.join(d, MANIFEST)), "has no bundle.json"),
        (lambda d: open(os.path.join(d, MANIFEST), "w").write("{"), "is not valid JSON"),
    ],
    ids=["missing-file", "truncated-weights", "no-manifest", "corrupt-manifest"],
)
def test_damaged_bundle_is_named(bundle, tmp_path, damage, message):
    target = _copy(bundle, tmp_path)
    damage(target)
    with pytest.raises(BundleError, match=message):
        load_bundle(target)


def test_flipped_byte_is_caught_by_the_hash(bundle, tmp_path):
    target = _copy(bundle, tmp_path)
    path = os.path.join(target, WEIGHTS)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_bundle(target)


def test_mismatched_config_and_vocabulary_are_named(bundle, tmp_path):
    target = _copy(bundle, tmp_path)
    manifest = json.loads(open(os.path.join(target, MANIFEST)).read())
    manifest["model"]["ranker"]["sparse"]["item_vocab"] += 5
    open(os.path.join(target, MANIFEST), "w").write(json.dumps(manifest))
    with pytest.raises(BundleError, match="model_version .* does not match"):
        load_bundle(target)
    # Even with a re-computed version, the weights do not fit the bigger item table.
    from components.bundle import _model_version

    manifest["model_version"] = _model_version(manifest["files"], manifest["model"])
    open(os.path.join(target, MANIFEST), "w").write(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"weights.safetensors: .*(t_item|item_rows).* is \("):
        load_bundle(target)
    # A vocabulary index beyond the model's table.
    target2 = _copy(bundle, tmp_path / "v")
    manifest = json.loads(open(os.path.join(target2, MANIFEST)).read())
    manifest["model"]["ranker"]["sparse"]["item_vocab"] = 3
    manifest["model_version"] = _model_version(manifest["files"], manifest["model"])
    open(os.path.join(target2, MANIFEST), "w").write(json.dumps(manifest))
    with pytest.raises(BundleError, match="items.parquet has item_idx .* item_vocab is 3 rows"):
        load_bundle(target2)


def test_w8a16_asked_of_a_float_only_bundle_is_refused(small_lake, trained, tmp_path):
    storage, checkpoint = trained
    out = str(tmp_path / "float")
    assert main(train_args(small_lake, storage, f"--export.checkpoint={checkpoint}", f"--export.output={out}")) == 0
    assert not os.path.exists(os.path.join(out, WEIGHTS_W8A16))
    with pytest.raises(BundleError, match="has no W8A16 weights"):
        load_bundle(out, w8a16=True)
    # Re-exporting over it replaces it whole; a folder that is not a bundle is never replaced.
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    args = train_args(small_lake, storage, f"--export.checkpoint={checkpoint}", f"--export.output={other}")
    assert main(args) == 1
    assert (other / "keep.txt").read_text() == "mine" and not list(tmp_path.glob(".not_a_bundle.tmp-*"))


def test_missing_checkpoint_exits_1_naming_it(small_lake, tmp_path, capsys):
    args = train_args(small_lake, str(tmp_path), f"--export.checkpoint={tmp_path}/nope")
    assert main(args) == 1
    assert "nope" in capsys.readouterr().err


def test_items_file_holds_the_candidate_features(bundle):
    table = pq.read_table(os.path.join(bundle, ITEMS))
    assert table.column_names == ["item_id", "item_idx", "genre_mask", "year", "tag_ids", "embedding_row"]


def test_vocabulary_rows_that_disagree_with_the_weights_are_named(bundle, tmp_path):
    """items.parquet's embedding_row must be the model's rare-id map (the featurizer counts rare
    ids by it): one changed row, even with the file's hash and the version re-computed, is refused."""
    from components.bundle import _model_version, _sha256

    target = _copy(bundle, tmp_path)
    items_path = os.path.join(target, ITEMS)
    items = pq.read_table(items_path)
    rows = items["embedding_row"].to_numpy().copy()
    own = int(np.flatnonzero(rows == items["item_idx"].to_numpy())[0])  # an item with a row of its own
    rows[own] = 1
    pq.write_table(
        items.set_column(items.column_names.index("embedding_row"), "embedding_row", pa.array(rows)), items_path
    )
    manifest = json.loads(open(os.path.join(target, MANIFEST)).read())
    manifest["files"][ITEMS] = {"sha256": _sha256(items_path), "bytes": os.path.getsize(items_path)}
    manifest["model_version"] = _model_version(manifest["files"], manifest["model"])
    open(os.path.join(target, MANIFEST), "w").write(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"items.parquet gives item_idx \d+ embedding row 1, the model's item map"):
        load_bundle(target)


def test_serving_auto_serves_the_weights_measured_faster_and_fp32_without_w8a16(bundle, small_lake, trained, tmp_path):
    """``serve.w8a16: auto`` (the default) decides by timing both models on this CPU; each verdict
    of the timer is followed, and a bundle without W8A16 weights is served in fp32 untimed."""
    from serving.bundle_choice import load_served_bundle, time_bundles
    from serving.config import ServeConfig
    from serving.sequence_store import SequenceStore

    store = SequenceStore.load(small_lake)
    auto = ServeConfig(profile_batches=6)
    assert auto.w8a16 == "auto"
    for float_ms, w8a16_ms in ((5.0, 3.0), (3.0, 5.0)):
        served, choice = load_served_bundle(bundle, store, auto, timer=lambda *_, t=(float_ms, w8a16_ms): list(t))
        assert served.quantized is choice.quantized is (w8a16_ms < float_ms)
        assert (choice.policy, choice.float_ms, choice.w8a16_ms) == ("auto", float_ms, w8a16_ms)

    def never(*_):
        raise AssertionError("timed a bundle without W8A16 weights")

    plain = str(tmp_path / "plain")
    storage, checkpoint = trained
    assert main(train_args(small_lake, storage, f"--export.checkpoint={checkpoint}", f"--export.output={plain}")) == 0
    served, choice = load_served_bundle(plain, store, auto, timer=never)
    assert not served.quantized and choice.float_ms is None
    for setting in (True, False):
        served, choice = load_served_bundle(bundle, store, ServeConfig(w8a16=setting), timer=never)
        assert served.quantized is choice.quantized is setting
    # The real timer: the same requests through both models, a median each.
    times = time_bundles([load_bundle(bundle), load_bundle(bundle, w8a16=True)], store, auto)
    assert len(times) == 2 and all(t > 0 for t in times)
