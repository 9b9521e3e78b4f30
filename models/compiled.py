"""``torch.compile`` of a ranker's dense blocks (``train.compile``), the eager model its oracle.

Only the blocks that are pure dense PyTorch are compiled: LONGER and the backbone (plain,
or UG-Sep's user and group halves). The embedding tables and the MSN/LMN memories are
TorchRec modules, sharded under DMP in training; compiling through them buys nothing and
breaks the graph. Every entry point a ``Ranker`` calls on those blocks is compiled, so
the training forward, UG-Sep's ``encode_user``/``score_candidates`` and the reference path
all run compiled code.

Compilation replaces bound methods on the module instances (not the classes), so the
parameters, the state dict and the checkpoints are those of the eager model.
"""

from __future__ import annotations

import torch
from torch import nn

# The methods Ranker calls on each compiled block.
COMPILED_METHODS: dict[str, tuple[str, ...]] = {
    "longer": ("encode_user", "score", "forward"),
    "backbone": ("forward_user", "forward_group", "forward"),
}


def compile_dense_blocks(
    model: nn.Module,
    mode: str | None = None,
    blocks: tuple[str, ...] = tuple(COMPILED_METHODS),
) -> list[str]:
    """Compile the dense ``blocks`` of ``model`` (a ``Ranker``) in place; the compiled method names.

    ``mode`` is torch.compile's (None = default, "max-autotune" tries GEMM templates too).
    Calling it twice is a no-op for methods already compiled.
    """
    unknown = set(blocks) - set(COMPILED_METHODS)
    if unknown:
        raise ValueError(f"compile_dense_blocks: unknown blocks {sorted(unknown)}; known: {list(COMPILED_METHODS)}")
    compiled = []
    for block_name in blocks:
        methods = COMPILED_METHODS[block_name]
        block = getattr(model, block_name, None)
        if block is None:
            continue
        for method in methods:
            if method in vars(block) or not hasattr(block, method):  # already compiled, or absent
                continue
            setattr(block, method, torch.compile(getattr(block, method), mode=mode))
            compiled.append(f"{block_name}.{method}")
    return compiled
