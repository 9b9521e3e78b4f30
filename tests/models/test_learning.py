"""Training behaviour on a tiny learnable task: one embedding init policy, LONGER learns as fast
as pooling, and a RankMixer-MoE serves (eval mode) what it was trained and validated to do."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

from models.cost import is_sparse_module
from models.embedding_init import EMBEDDING_STD
from models.ranker import Ranker, RankerConfig
from models.rankmixer import ReLUPerTokenMoE
from models.task import RankingTask, masked_bce
from models.variants import BASELINE_VARIANTS, ModelConfig, build_model
from tests.models.ranker_factories import VARIANTS, learnable_groups, tiny_ranker_config

logger = logging.getLogger(__name__)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    greater = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    return float(greater.mean())


def train(model: nn.Module, steps: int, lr: float, seed: int, **task_kw) -> RankingTask:
    """Adam on fresh ``learnable_groups`` batches (16 groups each)."""
    torch.manual_seed(seed)
    task = RankingTask(model.train())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = task(learnable_groups(1_000 * seed + step, batch=16, **task_kw))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task


# ---------------------------------------------------------------- one init policy
def embedding_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every embedding table's weight, by module path (TorchRec tables included)."""
    tables = {}
    for path, module in model.named_modules():
        if is_sparse_module(module):
            for name, param in module.named_parameters():
                if param.dim() == 2:
                    tables[f"{path}.{name}"] = param.detach()
    return tables


@pytest.mark.parametrize("variant", ["full", "dlrm_mlp", "din"])
def test_every_embedding_table_follows_one_init_policy(variant: str) -> None:
    torch.manual_seed(0)
    base = replace(tiny_ranker_config("tml_longer"), sparse=replace(tiny_ranker_config().sparse, item_vocab=4000))
    model = build_model(ModelConfig(variant=variant, ranker=base))
    tables = embedding_tables(model)
    kinds = {"t_item", "pos_emb", "action_emb", "gap_emb", "values"} if variant == "full" else {"item_emb", "user_emb"}
    assert all(any(kind in path for path in tables) for kind in kinds), sorted(tables)
    for path, weight in tables.items():
        padding = getattr(model.get_submodule(path.rsplit(".", 1)[0]), "padding_idx", None)
        rows = weight if padding is None else torch.cat([weight[:padding], weight[padding + 1 :]])
        # Unit variance per entry, whatever the vocabulary (4000 items or 12 actions) and width.
        assert rows.std().item() == pytest.approx(EMBEDDING_STD, rel=0.25), path
        assert abs(rows.mean().item()) < 0.25, path
        if padding is not None:
            assert not weight[padding].any(), f"{path}: padding row {padding} is not zero"
    assert variant in BASELINE_VARIANTS or isinstance(model, Ranker)


def test_longer_learns_within_the_budget_that_pooling_needs() -> None:
    """Under the old mixed defaults (TorchRec U(+-1/sqrt(vocab)) items beside N(0, 1) positions)
    LONGER sat at chance for the whole budget while pooling learnt in 50 steps."""
    held_out = learnable_groups(10_000, batch=64, num_clusters=4)
    results = {}
    for name, cfg in (
        ("pooling", replace(VARIANTS["tml_longer"], sequence_encoder="pooling")),
        ("longer", VARIANTS["tml_longer"]),
    ):
        torch.manual_seed(0)
        task = train(Ranker(cfg), steps=150, lr=1e-3, seed=0, num_clusters=4)
        logits, _ = task.evaluate(held_out)
        results[name] = auc(logits[..., 0].flatten(), held_out.labels[..., 0].flatten())
    logger.info("held-out AUC after 150 steps: %s", results)
    assert min(results.values()) > 0.9, results


# ---------------------------------------------------------------- RankMixer-MoE: serve what was validated
def moe_ranker_config() -> RankerConfig:
    base = replace(VARIANTS["rankmixer_moe"], sequence_encoder="pooling")
    return replace(
        base, rankmixer=replace(base.rankmixer, moe=replace(base.rankmixer.moe, num_experts=4, expert_expansion=2.0))
    )


@pytest.fixture(scope="module")
def trained_moe() -> RankingTask:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs before the per-test single-thread fixture
    try:
        torch.manual_seed(0)
        return train(Ranker(moe_ranker_config()), steps=200, lr=3e-3, seed=0, num_clusters=4, label_noise=0.05)
    finally:
        torch.set_num_threads(threads)


def test_rankmixer_moe_eval_loss_matches_train_loss_on_held_out_data(trained_moe: RankingTask) -> None:
    """Eval mode (sparse inference router) must predict as well as train mode (dense training router)."""
    held_out = learnable_groups(99_999, batch=128, num_clusters=4, label_noise=0.05)
    model = trained_moe.model
    with torch.no_grad():
        train_mode = masked_bce(model.train()(held_out).logits, held_out.labels, held_out.cand_mask).mean()
    _, logs = trained_moe.evaluate(held_out)
    eval_mode = (logs["bce_engage"] + logs["bce_like"]) / 2
    logger.info("held-out BCE: train mode %.4f, eval mode %.4f", train_mode, eval_mode)
    assert train_mode < 0.3  # it learnt (chance is 0.693; 5% label noise alone costs 0.199)
    assert abs(eval_mode - train_mode) <= 0.1 * train_mode
    moes = [m for m in model.modules() if isinstance(m, ReLUPerTokenMoE)]
    with torch.no_grad():
        out = model.train()(held_out)
    assert 0.0 < out.metrics["moe_active_ratio"] < 1.0  # the served router is really sparse
    assert len(moes) == model.cfg.rankmixer.num_layers


def test_eval_mode_logits_are_what_evaluate_reports_and_use_the_inference_router(trained_moe: RankingTask) -> None:
    held_out = learnable_groups(12_345, batch=8, num_clusters=4)
    model = trained_moe.model.train()
    logits, _ = trained_moe.evaluate(held_out)
    assert model.training  # evaluate restores the mode it found
    with torch.no_grad():
        served = model.eval()(held_out).logits
        # The same forward with the training router in the inference router's place differs:
        # evaluate really runs the served (inference) routing.
        swapped = Ranker(model.cfg).eval()
        swapped.load_state_dict(model.state_dict())
        for moe in (m for m in swapped.modules() if isinstance(m, ReLUPerTokenMoE)):
            moe.router_infer.load_state_dict(moe.router_train.state_dict())
        other = swapped(held_out).logits
    assert torch.equal(logits, served)
    assert not torch.allclose(other, served, atol=1e-4)


def test_inference_router_losses_train_only_the_inference_router() -> None:
    torch.manual_seed(1)
    model = Ranker(moe_ranker_config()).train()
    out = model(learnable_groups(3, batch=4))
    router_losses = out.aux_losses["moe_distill"] + out.aux_losses["moe_l1"]
    router_losses.backward()
    touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(".router_infer." in name for name in touched), sorted(touched)
