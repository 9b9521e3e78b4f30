"""Plant known bugs in models/ one at a time and show which model tests catch each.

    python -m tests.models.plant_bugs            # ~3 minutes on 2 cores

Every bug below once went unnoticed (or would have) by a suite that compared the model only
with itself. Each is applied to the source file, the model tests run in a subprocess, the
file is restored (also on Ctrl-C), and the failing tests are listed. Exit 1 if any bug
survives. Not part of ``make test``: it is the evidence that the suite can fail.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    correct: str
    planted: str


BUGS = (
    Bug(
        "sparse-MoE routed sum without the alpha = E/k scale",
        "models/tokenmixer_large.py",
        "return top_i, (self.cfg.alpha * top_p).to(logits.dtype)",
        "return top_i, top_p.to(logits.dtype)",
    ),
    Bug(
        "MSN gate not applied to the group tokens",
        "models/ranker.py",
        "            x_group = x_group * state.gate[:, None, None]\n",
        "            pass\n",
    ),
    Bug(
        "user removed from LMN's group query",
        "models/memory.py",
        "return self.group_proj(self.read(cand_items, user))",
        "return self.group_proj(self.read(cand_items, torch.zeros_like(user)))",
    ),
    Bug(
        "no detach on the RankMixer-MoE distillation target",
        "models/rankmixer.py",
        "target, target_gates = out.detach(), train_gates.detach()",
        "target, target_gates = out, train_gates",
    ),
    Bug(
        "inference-router losses reading an undetached input",
        "models/rankmixer.py",
        "logits = self.router_infer(x.detach(), tokens)",
        "logits = self.router_infer(x, tokens)",
    ),
    Bug(
        "non-causal sequence mask in LONGER",
        "models/longer.py",
        "(kind[None] == USER) | ((kind[None] == SEQ) & (pos[None] <= qp))",
        "(kind[None] == USER) | (kind[None] == SEQ)",
    ),
)


def failing_tests(bug: Bug) -> tuple[list[str], str]:
    """Run tests/models with ``bug`` planted; return the failing test names and pytest's summary."""
    path = ROOT / bug.path
    source = path.read_text()
    if source.count(bug.correct) != 1:
        raise SystemExit(f"{bug.path}: expected exactly one {bug.correct!r}; update {__file__}")
    try:
        path.write_text(source.replace(bug.correct, bug.planted))
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        path.write_text(source)
    failed = sorted({line.split()[1].split("[")[0] for line in run.stdout.splitlines() if line.startswith("FAILED")})
    return failed, run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]


def main(argv: list[str] | None = None) -> int:
    survivors = []
    for bug in BUGS:
        failed, summary = failing_tests(bug)
        print(f"## {bug.name}: {summary}")
        print("\n".join(f"   caught by {name}" for name in failed) or "   NOT CAUGHT")
        if not failed:
            survivors.append(bug.name)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
