"""The composed ranker: reuse path == an independent leaf-weight reference and == the no-reuse
oracle, user-side isolation, invariances, training, W8A16.

Every property runs over the tiny variants of ``tests/models/ranker_factories.py`` (TML + LONGER,
UG-Sep with/without compensation, UG-Sep + MSN + LMN, RankMixer + pooling, TML SP-MoE,
RankMixer ReLU-MoE), in eval mode and fp32 unless a test says otherwise.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import fields, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from models.batch import NUM_GENRES, NUM_YEAR_BUCKETS, GroupBatch
from models.quant import QuantConfig, quantize_w8a16, relative_error, weight_bytes
from models.ranker import Ranker, RankerConfig, RankerOutput, UserState
from models.task import RankingTask
from models.tokenmixer_large import SparseMoEConfig
from tests.models.leaf_reference import reference_logits
from tests.models.ranker_factories import MAX_SEQ, NUM_ITEMS, NUM_TAGS, VARIANTS, make_ranker, random_groups

logger = logging.getLogger(__name__)

ALL = list(VARIANTS)
UGSEP = [v for v in ALL if VARIANTS[v].use_ugsep]
MEMORY = [v for v in ALL if VARIANTS[v].use_msn or VARIANTS[v].use_lmn]
CAND_FIELDS = ("cand_item", "cand_genres", "cand_year", "cand_tags")
TOL = dict(atol=1e-5, rtol=1e-5)

MODELS = {name: make_ranker(name) for name in ALL}  # eval mode; tests that train build their own
sizes_st = dict(seed=st.integers(0, 10_000), batch=st.integers(1, 3), cands=st.integers(1, 5), seq=st.integers(1, 40))


# ---------------------------------------------------------------- helpers
def run(model: Ranker, batch: GroupBatch, reference: bool = False) -> RankerOutput:
    with torch.no_grad():
        return model.forward_reference(batch) if reference else model(batch)


def assert_outputs_close(a: RankerOutput, b: RankerOutput, **tol: float) -> None:
    tol = tol or TOL
    torch.testing.assert_close(a.logits, b.logits, **tol)
    assert len(a.aux_logits) == len(b.aux_logits)
    for x, y in zip(a.aux_logits, b.aux_logits):
        torch.testing.assert_close(x, y, **tol)


def select_groups(batch: GroupBatch, rows: Tensor) -> GroupBatch:
    """Groups ``rows`` of ``batch`` (every field is group-major)."""
    return replace(
        batch,
        **{
            f.name: getattr(batch, f.name).index_select(0, rows)
            for f in fields(batch)
            if getattr(batch, f.name) is not None
        },
    )


def with_candidates_of(batch: GroupBatch, other: GroupBatch) -> GroupBatch:
    """``batch``'s users with ``other``'s candidate slots (any N)."""
    return replace(batch, **{name: getattr(other, name) for name in (*CAND_FIELDS, "cand_mask", "labels")})


def left_pad(batch: GroupBatch, extra: int) -> GroupBatch:
    """The same groups with ``extra`` more padding events on the left of every sequence."""
    pad = torch.zeros(batch.batch_size, extra, dtype=torch.long)
    return replace(batch, **{k: torch.cat([pad, getattr(batch, k)], 1) for k in ("seq_item", "seq_action", "seq_gap")})


def add_padded_slots(batch: GroupBatch, extra: int, seed: int) -> GroupBatch:
    """``extra`` more candidate slots (cand_mask False) and random, non-zero contents in every
    padded slot, old and new. Real slots are untouched."""
    b, n = batch.batch_size, batch.num_candidates
    g = torch.Generator().manual_seed(seed)
    noise = {
        "cand_item": torch.randint(2, NUM_ITEMS, (b, n + extra), generator=g),
        "cand_genres": torch.ones(b, n + extra, NUM_GENRES),
        "cand_year": torch.randint(1, NUM_YEAR_BUCKETS, (b, n + extra), generator=g),
        "cand_tags": torch.randint(1, NUM_TAGS, (b, n + extra, batch.cand_tags.shape[2]), generator=g),
    }
    real = torch.cat([batch.cand_mask, torch.zeros(b, extra, dtype=torch.bool)], 1)  # (B, N')
    changes = {"cand_mask": real, "labels": torch.cat([batch.labels, torch.ones(b, extra, 2)], 1)}
    for name, theirs in noise.items():
        mine = getattr(batch, name)
        mine = torch.cat([mine, torch.zeros_like(theirs[:, n:])], 1)
        shaped = real.view(*real.shape, *([1] * (mine.dim() - 2)))
        changes[name] = torch.where(shaped, mine, theirs)
    return replace(batch, **changes)


def train_steps(model: Ranker, batch: GroupBatch, steps: int, lr: float) -> list[float]:
    """``steps`` Adam steps of ``RankingTask`` on one fixed batch; returns the loss before each step."""
    task = RankingTask(model.train())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = task(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ---------------------------------------------------------------- 1. reuse == independent references
def assert_matches_leaf_reference(model: Ranker, batch: GroupBatch, out: RankerOutput | None = None) -> None:
    """``out`` (default: the reuse path) equals the float64 leaf-weight recomputation on unpadded
    sequences (tests/models/leaf_reference.py) at every real candidate slot."""
    out = run(model, batch) if out is None else out
    ref, ref_shallow = reference_logits(model, batch)
    real = batch.cand_mask
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=1e-5)
    assert len(out.aux_logits) == len(ref_shallow)
    for got, want in zip(out.aux_logits, ref_shallow):
        torch.testing.assert_close(got.double()[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ALL)
@settings(max_examples=6, deadline=None)
@given(**sizes_st)
def test_reuse_path_equals_the_leaf_weight_reference(variant: str, seed: int, batch: int, cands: int, seq: int) -> None:
    model = MODELS[variant]
    assert_matches_leaf_reference(model, random_groups(seed, batch, cands, seq))


@pytest.mark.parametrize("variant", ALL)
@settings(max_examples=10, deadline=None)
@given(**sizes_st)
def test_reuse_path_equals_no_reuse_reference(variant: str, seed: int, batch: int, cands: int, seq: int) -> None:
    data = random_groups(seed, batch, cands, seq)
    model = MODELS[variant]
    fast, ref = run(model, data), run(model, data, reference=True)
    assert fast.logits.shape == (batch, cands, 2)
    assert torch.isfinite(fast.logits).all()
    assert len(fast.aux_logits) == len(model.cfg.tokenmixer_large.aux_layers) * (model.cfg.backbone != "rankmixer")
    assert_outputs_close(fast, ref)


@pytest.mark.parametrize("variant", ["tml_longer", "ugsep_msn_lmn", "tml_moe"])
def test_reuse_path_equals_reference_in_train_mode(variant: str) -> None:
    """Training runs the reuse path: its logits must be the oracle's there too (no dropout anywhere)."""
    model = make_ranker(variant).train()
    data = random_groups(2, batch=3, cands=4, seq=24)
    with torch.no_grad():
        fast, ref = model(data), model.forward_reference(data)
    assert_outputs_close(fast, ref)
    assert fast.aux_losses.keys() == ref.aux_losses.keys()


@pytest.mark.parametrize("variant", ALL)
def test_logits_depend_on_user_sequence_and_candidates(variant: str) -> None:
    """The invariance tests below could pass on a constant model; this one cannot."""
    model, data = MODELS[variant], random_groups(3, batch=2, cands=3, seq=16, min_seq_len=8)
    base = run(model, data).logits
    other_seq = replace(data, seq_item=torch.where(data.seq_item > 0, (data.seq_item + 7) % 60 + 2, 0))
    other_cands = with_candidates_of(data, random_groups(4, batch=2, cands=3, seq=16))
    other_user = replace(data, user_dense=data.user_dense + 1.0)
    real = data.cand_mask & other_cands.cand_mask
    for changed in (other_seq, other_user):
        assert not torch.allclose(run(model, changed).logits[data.cand_mask], base[data.cand_mask], atol=1e-4)
    assert not torch.allclose(run(model, other_cands).logits[real], base[real], atol=1e-4)


# ---------------------------------------------------------------- 2. user side never sees candidates
@pytest.mark.parametrize("variant", UGSEP)
def test_ugsep_user_tokens_of_the_backbone_come_from_user_inputs_only(variant: str) -> None:
    """Per-layer user-token states change with user features and are those of a per-user run."""
    model, data = MODELS[variant], random_groups(5, batch=3, cands=4, seq=20, min_seq_len=4)
    with torch.no_grad():
        state = model.encode_user(data)
        other = model.encode_user(replace(data, user_dense=data.user_dense + 0.5))
        alone = model.encode_user(select_groups(data, torch.tensor([1])))
    assert len(state.backbone.tokens) == model.backbone.cfg.backbone_config.num_layers + 1
    assert not torch.allclose(state.backbone.output, other.backbone.output)
    for mine, single in zip(
        state.backbone.tokens + state.backbone.contents, alone.backbone.tokens + alone.backbone.contents
    ):
        torch.testing.assert_close(mine[1:2], single, **TOL)


@pytest.mark.parametrize("variant", ["ugsep", "ugsep_msn_lmn", "tml_longer"])
def test_reference_user_side_computed_with_the_candidate_inside_matches_the_cached_state(variant: str) -> None:
    """The no-reuse path sees each candidate INSIDE LONGER's full stack and the masked backbone;
    its user-side results must still equal the cached, candidate-free ones, for any candidates.
    (A leaking mask in LONGER or UG-Sep makes the reference's user side depend on the candidate.)"""
    model, data = MODELS[variant], random_groups(7, batch=2, cands=3, seq=20, min_seq_len=4)
    n, t_u = data.num_candidates, model.tokenizer.cfg.num_tokens("user")
    for cands_seed in (8, 9):
        batch = with_candidates_of(data, random_groups(cands_seed, batch=2, cands=3, seq=20))
        flat = batch.per_candidate()
        with torch.no_grad():
            state, ref = model.encode_user(batch), model.encode_user(flat, reference=True)
            for name, value in state.user_features.items():
                torch.testing.assert_close(ref.user_features[name], value.repeat_interleave(n, 0), **TOL)
            if model.cfg.use_ugsep:
                x_group = model.tokenizer({**ref.user_features, **model._group_features(ref, flat)}, side="group")
                masked = model.backbone(ref.x_user, x_group).tokens[:, 0, :t_u]  # (B*N, T_u, D)
                torch.testing.assert_close(masked, state.backbone.output.repeat_interleave(n, 0), **TOL)


# ---------------------------------------------------------------- 3. candidate-permutation equivariance
@pytest.mark.parametrize("variant", ALL)
@settings(max_examples=8, deadline=None)
@given(**sizes_st)
def test_candidate_permutation_permutes_logits(variant: str, seed: int, batch: int, cands: int, seq: int) -> None:
    model, data = MODELS[variant], random_groups(seed, batch, cands, seq)
    perm = torch.randperm(cands, generator=torch.Generator().manual_seed(seed))
    base, permuted = run(model, data), run(model, data.candidate_slice(perm))
    torch.testing.assert_close(permuted.logits, base.logits[:, perm], atol=1e-6, rtol=1e-6)
    for got, want in zip(permuted.aux_logits, base.aux_logits):
        torch.testing.assert_close(got, want[:, perm], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- 4. padding invariance
@pytest.mark.parametrize("variant", ALL)
@settings(max_examples=8, deadline=None)
@given(extra_seq=st.integers(1, 8), extra_cands=st.integers(1, 3), **sizes_st)
def test_padding_does_not_change_real_logits(
    variant: str, extra_seq: int, extra_cands: int, seed: int, batch: int, cands: int, seq: int
) -> None:
    assert seq + extra_seq <= MAX_SEQ
    model, data = MODELS[variant], random_groups(seed, batch, cands, seq)
    base = run(model, data).logits
    padded = run(model, add_padded_slots(left_pad(data, extra_seq), extra_cands, seed)).logits
    assert padded.shape == (batch, cands + extra_cands, 2)
    real = data.cand_mask
    torch.testing.assert_close(padded[:, :cands][real], base[real], **TOL)
    assert (padded[:, :cands][~real] == 0).all() and (padded[:, cands:] == 0).all()
    assert (base[~real] == 0).all()


# ---------------------------------------------------------------- 5. batch independence
@pytest.mark.parametrize("variant", ALL)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(2, 4), cands=st.integers(1, 5), seq=st.integers(1, 40))
def test_group_logits_do_not_depend_on_other_groups(variant: str, seed: int, batch: int, cands: int, seq: int) -> None:
    model, data = MODELS[variant], random_groups(seed, batch, cands, seq)
    full = run(model, data)
    row = seed % batch
    alone = run(model, select_groups(data, torch.tensor([row])))
    reordered = run(model, select_groups(data, torch.arange(batch).flip(0)))
    torch.testing.assert_close(alone.logits, full.logits[row : row + 1], **TOL)
    torch.testing.assert_close(reordered.logits, full.logits.flip(0), **TOL)
    for a, f in zip(alone.aux_logits, full.aux_logits):
        torch.testing.assert_close(a, f[row : row + 1], **TOL)


# ---------------------------------------------------------------- 6. state_dict round trip
@pytest.mark.parametrize("variant", ALL)
def test_state_dict_round_trip_gives_identical_outputs(variant: str) -> None:
    model, data = MODELS[variant], random_groups(7, batch=3, cands=4, seq=20)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    clone = make_ranker(variant, seed=1)
    assert not torch.equal(run(clone, data).logits, run(model, data).logits)  # really a different init
    clone.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    a, b = run(model, data), run(clone, data)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.aux_logits, b.aux_logits))


# ---------------------------------------------------------------- 7. gradients reach every parameter
@pytest.mark.parametrize("variant", ALL)
def test_gradients_reach_every_parameter_in_train_mode(variant: str) -> None:
    model = make_ranker(variant, seed=2).train()
    data = random_groups(8, batch=4, cands=5, seq=24, min_seq_len=6)
    loss, logs = RankingTask(model)(data)
    assert torch.isfinite(loss) and logs["loss"] == pytest.approx(float(loss.detach()))
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    # Embedding rows of unseen ids get zero grads legitimately; a module's total must not be zero.
    for name, module in model.named_modules():
        own = [p.grad for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            norm = torch.sqrt(sum(g.square().sum() for g in own))
            assert norm > 0, f"module {name or '<root>'} got an all-zero gradient"


@pytest.mark.parametrize("variant", MEMORY)
def test_memory_keys_and_values_learn(variant: str) -> None:
    model = make_ranker(variant, seed=2).train()
    loss, logs = RankingTask(model)(random_groups(9, batch=4, cands=5, seq=24, min_seq_len=6))
    if model.cfg.use_lmn:
        assert logs["lmn_memory_loss"] > 0
    loss.backward()
    memories = [m.memory for m in (model.msn, model.lmn) if m is not None]
    assert len(model.memory_value_parameters()) == len(memories)
    for memory in memories:
        values = f"values.embedding_bags.{memory.cfg.table_name}.weight"
        for name in (values, "raw_keys", "query.weight", "log_scale"):
            grad = memory.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, f"PKM {name} got no gradient"
        # Only the top-k slots read are touched: the value gradient is sparse in its rows.
        hit_rows = (memory.get_parameter(values).grad.abs().sum(1) > 0).sum()
        assert 0 < hit_rows < memory.cfg.num_slots


def test_memory_value_tables_have_distinct_torchrec_names() -> None:
    """The planner and the sharded state dict key by table name: MSN's and LMN's must differ."""
    model = make_ranker("ugsep_msn_lmn", seed=0)
    tables = model.memory_value_tables()
    assert list(tables) == ["t_msn_value", "t_lmn_value"]
    assert tables["t_msn_value"] is model.msn.memory.values and tables["t_lmn_value"] is model.lmn.memory.values
    weights = [p for table in tables.values() for p in table.parameters()]
    assert list(map(id, weights)) == list(map(id, model.memory_value_parameters()))
    assert {
        "msn.memory.values.embedding_bags.t_msn_value.weight",
        "lmn.memory.values.embedding_bags.t_lmn_value.weight",
    } <= set(model.state_dict())
    assert make_ranker("tml_longer", seed=0).memory_value_tables() == {}


# ---------------------------------------------------------------- 8. W8A16
def is_moe(variant: str) -> bool:
    cfg = VARIANTS[variant]
    moe = cfg.rankmixer.moe if cfg.backbone == "rankmixer" else cfg.tokenmixer_large.moe
    return moe.enabled


@pytest.mark.parametrize("variant", ["tml_longer", "ugsep", "ugsep_msn_lmn", "rankmixer_moe"])
def test_w8a16_stays_close_to_the_trained_float_model(variant: str) -> None:
    model = make_ranker(variant, seed=3)
    train_steps(model, random_groups(10, batch=4, cands=5, seq=24), steps=5, lr=3e-3)
    data = random_groups(11, batch=3, cands=5, seq=30)
    ref = run(model, data)
    quant = quantize_w8a16(model)
    quant_ref = quantize_w8a16(model, QuantConfig(kernel="reference"))
    err = relative_error(ref.logits, run(quant, data).logits)
    err_ref = relative_error(ref.logits, run(quant_ref, data).logits)
    ratio = weight_bytes(quant) / weight_bytes(model)
    logger.info("W8A16 %s: rel err auto %.4f reference %.4f, weight bytes ratio %.3f", variant, err, err_ref, ratio)
    assert err <= 0.03, f"W8A16 (auto kernel: bf16 activations) relative error {err:.4f}"
    assert err_ref <= 0.025, f"W8A16 (reference kernel: fp32 activations) relative error {err_ref:.4f}"
    assert weight_bytes(quant, include_sparse=True) > weight_bytes(quant)  # tables untouched, still there
    assert ratio < 0.3, f"W8A16 keeps {ratio:.2f} of the float weight bytes"


@pytest.mark.parametrize("variant", ["tml_moe", "rankmixer_moe"])
def test_w8a16_quantizes_moe_expert_weights(variant: str) -> None:
    model = MODELS[variant]
    assert weight_bytes(quantize_w8a16(model)) / weight_bytes(model) < 0.3


@pytest.mark.parametrize("variant", ["ugsep", "tml_longer"])
def test_w8a16_reference_kernel_keeps_reuse_exact(variant: str) -> None:
    """Quantization changes the weights, not the math: reuse == no-reuse still holds."""
    quant = quantize_w8a16(MODELS[variant], QuantConfig(kernel="reference"))
    data = random_groups(12, batch=2, cands=4, seq=20)
    assert_outputs_close(run(quant, data), run(quant, data, reference=True))


# UG-Sep over a Sparse-Pertoken MoE that picks every expert (top_k = E): its output is continuous
# in its input, so bf16 activations cannot flip an expert choice and fast == reference is checkable.
UGSEP_MOE = replace(
    VARIANTS["ugsep"],
    tokenmixer_large=replace(VARIANTS["ugsep"].tokenmixer_large, moe=SparseMoEConfig(num_experts=2, top_k=2)),
)


def fast_and_reference(model: Ranker) -> tuple[Ranker, Ranker]:
    """W8A16 copies with the fast kernels (every matrix eligible for int8pack) and the reference kernel."""
    return quantize_w8a16(model, QuantConfig(int8pack_min_weights=0)), quantize_w8a16(
        model, QuantConfig(kernel="reference")
    )


@pytest.mark.parametrize("variant", ["ugsep", "ugsep_moe_all_experts", "rankmixer_moe", "tml_longer"])
@pytest.mark.parametrize("cands", [1, 40])  # 1 row per matrix (int8pack) and 40+ (bf16 upcast)
def test_w8a16_fast_kernels_match_the_reference_kernel(variant: str, cands: int) -> None:
    torch.manual_seed(3)
    model = Ranker(UGSEP_MOE).eval() if variant == "ugsep_moe_all_experts" else MODELS[variant]
    fast, ref = fast_and_reference(model)
    data = random_groups(14, batch=2, cands=cands, seq=20)
    with torch.no_grad():
        err = relative_error(model.encode_user(data).x_user, fast.encode_user(data).x_user)
        assert err < 2e-2, f"user path {err:.4f}"
        assert relative_error(run(ref, data).logits, run(fast, data).logits) < 2e-2


def test_w8a16_splits_ugsep_first_layers_into_user_and_group_column_blocks() -> None:
    quant = quantize_w8a16(Ranker(UGSEP_MOE).eval())
    mix_ffn = quant.backbone.backbone.blocks[0].mix_ffn
    # 9 tokens of width 32 mixed into 8 heads of width 36: the 4 user tokens fill the first 16 columns.
    for layer in (mix_ffn.router, mix_ffn.shared.gate_up, mix_ffn.gate_up):
        assert layer.block_names == ("qweight_head", "qweight_tail") and layer.column_starts == (0, 16, 36)
    assert mix_ffn.down.block_names == ("qweight",)  # the down projection is never split
    data = random_groups(15, batch=2, cands=3, seq=20)
    assert_outputs_close(run(quant, data), run(quant, data, reference=True), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("variant", ["ugsep", "tml_moe", "rankmixer_moe"])
def test_w8a16_state_dict_round_trip(variant: str) -> None:
    """A quantized state dict loads into the quantized copy of a freshly built model: same outputs."""
    quant = quantize_w8a16(make_ranker(variant, seed=0))
    fresh = quantize_w8a16(make_ranker(variant, seed=1))
    data = random_groups(16, batch=2, cands=3, seq=20)
    assert relative_error(run(quant, data).logits, run(fresh, data).logits) > 1e-3  # different weights ...
    fresh.load_state_dict(quant.state_dict())
    torch.testing.assert_close(run(fresh, data).logits, run(quant, data).logits, atol=0, rtol=0)  # ... now equal


# ---------------------------------------------------------------- 9. learning
def test_ranking_task_loss_decreases_on_a_fixed_batch() -> None:
    model = make_ranker("tml_longer", seed=4)
    data = random_groups(13, batch=4, cands=5, seq=24, min_seq_len=4)
    losses = train_steps(model, data, steps=30, lr=3e-3)
    logger.info("loss %.4f -> %.4f over 30 steps", losses[0], losses[-1])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert min(losses[-5:]) < min(losses[:5])


# ---------------------------------------------------------------- 10. serving cache pattern
@pytest.mark.parametrize("variant", ALL)
def test_one_cached_user_state_scores_several_candidate_sets_as_the_leaf_reference_does(variant: str) -> None:
    """Serving encodes a user once and scores many candidate sets against the cached state."""
    model = MODELS[variant]
    first = random_groups(14, batch=3, cands=4, seq=20)
    with torch.no_grad():
        state = model.encode_user(first)
    for seed, cands in ((15, 6), (16, 1), (17, 4)):
        other = with_candidates_of(first, random_groups(seed, batch=3, cands=cands, seq=20))
        with torch.no_grad():
            scored = model.score_candidates(state, other)
        assert_matches_leaf_reference(model, other, scored)
    assert state.nbytes() > 0
    if state.longer is not None:
        assert state.nbytes() > state.longer.nbytes() > 0
    if model.cfg.use_ugsep:
        assert state.backbone is not None and state.nbytes() > state.x_user.numel() * 4 * 2


# ---------------------------------------------------------------- configuration errors
def test_rankmixer_dim_must_divide_into_the_token_layout() -> None:
    with pytest.raises(ValueError, match=r"dim=30 must be a multiple of the 8 tokens"):
        RankerConfig(backbone="rankmixer", dim=30)


def test_task_needs_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        RankingTask(MODELS["tml_longer"])(replace(random_groups(0), labels=None))


@pytest.mark.parametrize(
    "backbone,feature_tokens,total", [("tokenmixer_large", 16, 17), ("tokenmixer_large", 32, 33), ("rankmixer", 16, 16)]
)
def test_feature_groups_split_into_the_papers_token_counts(backbone: str, feature_tokens: int, total: int) -> None:
    cfg = replace(VARIANTS["ugsep"], backbone=backbone, dim=64, num_feature_tokens=feature_tokens)
    tok = cfg.tokenizer_config()
    assert cfg.num_tokens == total and sum(g.num_tokens for g in tok.groups) == feature_tokens
    # 8 groups here: an equal share each, the remainder to the widest groups; sides stay pure.
    assert min(g.num_tokens for g in tok.groups) == feature_tokens // len(tok.groups)
    assert tok.num_tokens("user") + tok.num_tokens("group") == total
    model = Ranker(cfg).eval()
    data = random_groups(3, batch=2, cands=3, seq=12)
    assert_outputs_close(run(model, data), run(model, data, reference=True))


def test_feature_tokens_below_the_group_count_are_refused() -> None:
    with pytest.raises(ValueError, match=r"num_feature_tokens=4 is below the 8 feature groups"):
        replace(VARIANTS["ugsep"], num_feature_tokens=4)


@pytest.mark.parametrize("variant", ALL)
def test_stacked_user_states_score_every_group_as_it_scores_alone(variant: str) -> None:
    """Serving's batch path: states of different users (a repeat included) and candidate sets
    of different sizes and sequence widths, stacked into one score_candidates call."""
    model = MODELS[variant]
    groups = [random_groups(seed=s, batch=1, cands=c, seq=q) for s, c, q in ((1, 2, 5), (2, 6, 30), (3, 1, 12))]
    groups.append(groups[0])  # the same user twice in one batch (two chunks of one request)
    with torch.no_grad():
        states = [model.encode_user(g) for g in groups]
        alone = [model.score_candidates(s, g).logits for s, g in zip(states, groups)]
        stacked = model.score_candidates(UserState.cat(states), GroupBatch.stack(groups)).logits
    assert stacked.shape[:2] == (len(groups), 6)
    for row, (group, logits) in enumerate(zip(groups, alone)):
        n = group.num_candidates
        torch.testing.assert_close(stacked[row, :n], logits[0], **TOL)
        assert not stacked[row, n:].any()  # padded slots stay masked


def test_stack_pads_sequences_on_the_left_and_candidates_on_the_right() -> None:
    a, b = random_groups(seed=4, batch=1, cands=2, seq=3), random_groups(seed=5, batch=2, cands=4, seq=7)
    both = GroupBatch.stack([a, b])
    assert (both.batch_size, both.seq_item.shape[1], both.num_candidates) == (3, 7, 4)
    torch.testing.assert_close(both.seq_item[0, 4:], a.seq_item[0])  # the most recent event stays last
    assert not both.seq_item[0, :4].any() and not both.cand_mask[0, 2:].any()
    torch.testing.assert_close(both.cand_tags[1:], b.cand_tags)
    torch.testing.assert_close(both.labels[0, :2], a.labels[0])
    with pytest.raises(ValueError, match="at least one"):
        GroupBatch.stack([])
