"""Where a ranker's training step spends its time, per component (``bench perf``).

One step runs under ``torch.profiler``. Every public method and every module call of a
component opens a profiler scope named for it, so each forward op falls under one scope.
A backward op is charged to the component whose forward op created its autograd node:
the profiler records the node's sequence number on both (``FunctionEvent.sequence_nr``).
The dense optimizer step gets a scope of its own; the fused sparse optimizer runs inside
the embedding tables' backward, so it is charged to the embeddings. What no scope claims
(the loss, the glue between components, autograd's own bookkeeping) is ``other``.

The profiled step is slower than a plain one (the profiler's own cost), so the breakdown is
reported as fractions of the profiled step next to the seconds it measured.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

SCOPE_PREFIX = "component:"

# Ranker attributes -> the component they belong to (a missing attribute is skipped).
RANKER_COMPONENTS: dict[str, tuple[str, ...]] = {
    "embeddings_and_sparse_optimizer": ("sparse_arch", "year_emb"),
    "longer": ("longer", "longer_user", "longer_cand"),
    "memory": ("msn", "lmn"),
    "backbone": ("tokenizer", "backbone"),
    "heads": ("heads",),
}
DENSE_OPTIMIZER = "dense_optimizer"
OTHER = "other"


def _enter(label: str):
    return torch.ops.profiler._record_function_enter_new(SCOPE_PREFIX + label, None)


def _exit(handle) -> None:
    torch.ops.profiler._record_function_exit._RecordFunction(handle)


def _scoped(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(SCOPE_PREFIX + label):
            return fn(*args, **kwargs)

    return wrapper


def _public_methods(module: nn.Module) -> list[str]:
    """Methods a caller may invoke on ``module`` beyond ``__call__``: those its own classes define."""
    names = set()
    for cls in type(module).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch."):
            continue
        names |= {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_") and n != "forward"}
    return sorted(names)


@contextmanager
def component_scopes(model: nn.Module, components: dict[str, tuple[str, ...]] = RANKER_COMPONENTS) -> Iterator[None]:
    """Open a profiler scope around every call into each component of ``model`` (hooks on every
    module of it, wrappers on the public methods of its top modules); all removed on exit.
    The hooks enter and exit a scope in two calls, hence the profiler's raw ops there."""
    hooks, patched, handles = [], [], {}
    for label, attrs in components.items():
        for attr in attrs:
            root = getattr(model, attr, None)
            if not isinstance(root, nn.Module):
                continue
            for module in root.modules():
                key = id(module)
                pre = lambda _m, _args, key=key, label=label: handles.setdefault(key, []).append(_enter(label))
                post = lambda _m, _args, _out, key=key: _exit(handles[key].pop())
                hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
            for name in _public_methods(root):
                method = getattr(root, name)
                if name not in vars(root) and callable(method):
                    setattr(root, name, _scoped(method, label))
                    patched.append((root, name))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for root, name in patched:
            delattr(root, name)


def _component_of(event, cache: dict[int, str | None]) -> str | None:
    """The outermost component scope enclosing a profiler event (itself included), if any."""
    chain, node = [], event
    while node is not None and node.id not in cache:
        chain.append(node)
        node = node.cpu_parent
    outer = None if node is None else cache[node.id]
    for node in reversed(chain):  # top down: an enclosing scope wins over the ones inside it
        if outer is None and node.name.startswith(SCOPE_PREFIX):
            outer = node.name[len(SCOPE_PREFIX) :]
        cache[node.id] = outer
    return outer


def profile_step(step: Callable[[], None], model: nn.Module, optimizer_step: Callable[[], None]) -> dict:
    """Profile one training step: ``step()`` runs forward + backward, then ``optimizer_step()``.

    Returns ``{"step_s": wall seconds of the profiled step, "seconds": {component: s},
    "fraction": {component: share of step_s}}``; the components sum to the step.
    """
    with component_scopes(model), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        with torch.profiler.record_function(SCOPE_PREFIX + DENSE_OPTIMIZER):
            optimizer_step()
        wall = time.perf_counter() - start
    events = prof.events()
    cache: dict[int, str | None] = {}
    by_sequence: dict[int, str] = {}
    seconds: dict[str, float] = {}
    for ev in events:  # forward: top-level component scopes, and which ops created which nodes
        if ev.name.startswith(SCOPE_PREFIX) and _component_of(ev.cpu_parent, cache) is None:
            label = ev.name[len(SCOPE_PREFIX) :]
            seconds[label] = seconds.get(label, 0.0) + ev.cpu_time_total / 1e6
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            label = _component_of(ev, cache)
            if label is not None:
                by_sequence.setdefault(ev.sequence_nr, label)
    for ev in events:  # backward: each node's evaluation, charged to its forward op's component
        if ev.name.startswith("autograd::engine::evaluate_function") and ev.cpu_parent is None:
            label = by_sequence.get(ev.sequence_nr)
            if label is not None:
                seconds[label] = seconds.get(label, 0.0) + ev.cpu_time_total / 1e6
    seconds[OTHER] = max(wall - sum(seconds.values()), 0.0)
    order = [*RANKER_COMPONENTS, DENSE_OPTIMIZER, OTHER]
    seconds = {k: round(seconds.get(k, 0.0), 4) for k in order}
    return {
        "step_s": round(wall, 4),
        "seconds": seconds,
        "fraction": {k: round(v / wall, 4) for k, v in seconds.items()},
    }
