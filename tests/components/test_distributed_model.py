"""DistributedRanker on a real one-rank gloo group: TorchRec DMP shards the embedding and memory
value tables with fused optimizers, AdamW takes the rest, and the DCP state round-trips exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from components.distributed_model import DistributedRanker, ShardingSpec, torchrec_tables
from models.ranker import Ranker
from models.task import RankingTask
from pipelines.train_loop import ensure_process_group
from tests.models import ranker_factories as rf


@pytest.fixture(scope="module")
def group():
    torch.set_num_threads(1)
    own = ensure_process_group()
    yield
    if own:
        dist.destroy_process_group()


def _build(spec: ShardingSpec | None = None) -> DistributedRanker:
    torch.manual_seed(0)
    spec = spec or ShardingSpec()
    return DistributedRanker.build(RankingTask(Ranker(rf.VARIANTS["ugsep_msn_lmn"])), spec, torch.device("cpu"))


def _steps(dr: DistributedRanker, batches) -> None:
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)
        loss, _ = dr.module(batch)
        dr.zero_grad()
        loss.backward()
        dr.step()


def _full(value) -> torch.Tensor:
    """A (possibly sharded) tensor as one local tensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(value, ShardedTensor):
        return value.detach().clone()
    out = torch.zeros(value.size())
    for shard in value.local_shards():
        index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        out[index] = shard.tensor
    return out


BATCHES = [rf.random_groups(seed=i, batch=4, cands=5, seq=20) for i in range(6)]


def test_every_table_is_sharded_with_a_fused_optimizer_and_no_dense_state(group):
    names = {name for _, name, _ in torchrec_tables(Ranker(rf.VARIANTS["ugsep_msn_lmn"]))}
    assert names == {"t_item", "t_user", "t_tag", "t_msn_value", "t_lmn_value"}
    dr = _build()
    fused = dr.fused_optimizer().state_dict()["state"]
    assert {key.rsplit(".", 2)[-2] for key in fused} == names  # every table has fused state
    assert not any(n in name for name in dr.dense_names for n in names)  # none of them in AdamW
    # Row-wise Adagrad: one float per row, where Adam keeps two per element.
    tables = [v for k, v in dr.state_dict()["model"].items() if k.rsplit(".", 2)[-2] in names]
    assert len(tables) == len(names)
    assert dr.sparse_state_bytes() == sum(t.size()[0] * 4 for t in tables)


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_the_sharded_model_starts_from_the_unsharded_models_values(group, sharding):
    """DMP would re-draw every table shard by shard; the seed's values (item, user, tag tables and
    the MSN/LMN memory values) are copied in, so the same seed gives the same starting model."""
    torch.manual_seed(0)
    unsharded = RankingTask(Ranker(rf.VARIANTS["ugsep_msn_lmn"]))
    expected = {k: v.detach().clone() for k, v in unsharded.state_dict().items()}
    dr = _build(ShardingSpec(sharding_types=(sharding,)))
    state = dr.state_dict()["model"]
    names = {"t_item", "t_user", "t_tag", "t_msn_value", "t_lmn_value"}
    tables = {k for k in state if k.rsplit(".", 2)[-2] in names}
    assert {k.rsplit(".", 2)[-2] for k in tables} == names
    for key in sorted(tables):
        torch.testing.assert_close(_full(state[key]), expected[f"model.{key}"], rtol=0, atol=0, msg=key)
    # The live shards hold them too: the sharded model scores as the unsharded one.
    batch = BATCHES[0]
    served, _ = dr.task.evaluate(batch)
    reference, _ = unsharded.evaluate(batch)
    torch.testing.assert_close(served, reference, rtol=1e-5, atol=1e-5)


def test_memory_tables_train_at_the_memory_rate_and_embeddings_at_the_sparse_rate(group):
    """One SGD step: a row's change is lr x its gradient, so the two rates show directly."""
    spec = ShardingSpec(sparse_optimizer="sgd", sparse_lr=0.5, memory_lr=0.0)
    dr = _build(spec)
    before = {k: _full(v) for k, v in dr.state_dict()["model"].items() if ".t_" in k}
    _steps(dr, BATCHES[:1])
    after = {k: _full(v) for k, v in dr.state_dict()["model"].items() if ".t_" in k}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("t_item" in k for k in moved)
    assert not any("value" in k for k in moved)  # memory_lr 0: the memory values stay


def test_checkpoint_round_trip_resumes_bit_for_bit(group, tmp_path):
    whole = _build()
    _steps(whole, BATCHES)
    first = _build()
    _steps(first, BATCHES[:3])
    dcp.save(first.state_dict(), checkpoint_id=str(tmp_path))
    resumed = _build()
    state = resumed.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    resumed.load_state_dict(state)
    _steps(resumed, BATCHES[3:])
    a, b = whole.state_dict(), resumed.state_dict()
    for part in ("model", "sparse_opt"):
        flat_a = {k: v for k, v in _flatten(a[part]).items()}
        flat_b = _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(_full(flat_a[key]), _full(flat_b[key])), key
    for name in whole.dense_names:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["dense_opt"][name][key], b["dense_opt"][name][key]), (name, key)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def test_unsharded_model_loads_a_sharded_checkpoint(group, tmp_path):
    dr = _build()
    _steps(dr, BATCHES[:2])
    dcp.save(dr.state_dict(), checkpoint_id=str(tmp_path))
    model = Ranker(rf.VARIANTS["ugsep_msn_lmn"])
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    model.load_state_dict(state["model"])
    trained = dr.state_dict()["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, _full(trained[key])), key
    model.eval(), dr.task.eval()
    with torch.no_grad():
        expected = dr.task.model(BATCHES[5]).logits
        assert torch.allclose(model(BATCHES[5]).logits, expected, atol=1e-6)
