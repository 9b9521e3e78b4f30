"""The training step's fast paths against their references: fused AdamW vs the per-tensor
loop, torch.compile'd dense blocks vs eager (fp32, <= 1e-5), and glibc's retained heap."""

from __future__ import annotations

import copy

import torch

from components.distributed_model import ShardingSpec, dense_adamw
from components.host_memory import retain_freed_memory
from models.compiled import compile_dense_blocks
from models.task import RankingTask
from tests.models.ranker_factories import make_ranker, random_groups


def _steps(task: RankingTask, optimizer: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for batch in batches:
        loss, _ = task(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_fused_adamw_takes_the_same_steps_as_the_foreach_loop():
    batches = [random_groups(seed=s) for s in range(3)]
    eager = RankingTask(make_ranker("ugsep").train())
    fused = copy.deepcopy(eager)
    loop_opt = dense_adamw(list(eager.parameters()), ShardingSpec(weight_decay=0.01, fused_optimizer=False))
    fused_opt = dense_adamw(list(fused.parameters()), ShardingSpec(weight_decay=0.01))
    assert fused_opt.defaults["fused"] and not loop_opt.defaults["fused"]
    torch.testing.assert_close(
        _steps(fused, fused_opt, batches), _steps(eager, loop_opt, batches), rtol=1e-5, atol=1e-5
    )
    # Adam divides by sqrt(v): where a gradient is ~0 its rounding is amplified up to lr-sized steps,
    # so parameters are compared at the fp32 exactness bound rather than bit for bit.
    for (name, a), (_, b) in zip(eager.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    untrained = make_ranker("ugsep").parameters()
    assert any(not torch.equal(a, b) for a, b in zip(fused.model.parameters(), untrained, strict=True))  # it moved


def test_compiled_backbone_matches_eager_forward_and_backward():
    """Inductor on the backbone (the block the perf bench compiles); LONGER goes through the same
    method replacement. Compiling the whole tiny ranker takes minutes on 2 cores: not in make test."""
    batch = random_groups(seed=1)
    eager = RankingTask(make_ranker("tml_longer").train())
    compiled = copy.deepcopy(eager)
    assert compile_dense_blocks(compiled.model, blocks=("backbone",)) == ["backbone.forward"]
    assert compile_dense_blocks(compiled.model, blocks=("backbone",)) == []  # already compiled: a no-op
    losses = []
    for task in (eager, compiled):
        loss, _ = task(batch)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged


def test_retained_heap_changes_no_values():
    torch.manual_seed(0)
    x = torch.randn(64, 1 << 16)  # 16 MiB blocks, freed and reallocated
    before = (x @ x.T).sum()
    assert retain_freed_memory() and retain_freed_memory()  # glibc (Linux CI); idempotent
    torch.testing.assert_close((x @ x.T).sum(), before, rtol=0, atol=0)
