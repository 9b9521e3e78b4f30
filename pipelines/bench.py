"""Benchmarks: ``python -m pipelines.bench {data,models,train,quality,serving,perf,gpu} ... --json PATH``.

Each benchmark measures against a baseline run in the same process and reports ratios,
because the machines are shared and noisy. See README for the measured numbers.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m pipelines.bench {data,models,train,quality,serving,perf,gpu} [options] --json PATH"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind == "data":
        from pipelines.bench_data import main as run
    elif kind == "models":
        from pipelines.bench_models import main as run
    elif kind == "train":
        from pipelines.bench_train import main as run
    elif kind == "quality":
        from pipelines.bench_quality import main as run
    elif kind == "serving":
        from pipelines.bench_serving import main as run
    elif kind == "perf":
        from pipelines.bench_perf import main as run
    elif kind == "gpu":
        from pipelines.bench_gpu import main as run
    else:
        print(f"unknown benchmark {kind!r}; {usage}", file=sys.stderr)
        return 2
    try:
        return run(rest)
    except SystemExit as exc:  # a benchmark's argparse (bad arguments, --help): returned, not raised
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


if __name__ == "__main__":
    raise SystemExit(main())
