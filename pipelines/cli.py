"""The shared shape of every pipeline entry point: ``--config PRESET`` + ``--section.key=value``.

Exit codes are the same everywhere: 0 done, 1 the run failed on its data or the lake,
2 the configuration is wrong (unknown key, wrong type, a setting that cannot be honoured).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from components.config_loader import ConfigError, load_config
from pipelines.config import PipelineConfig
from pipelines.library_chatter import quiet_libraries

# The loggers of the project's packages (``__main__``: an entry point run with ``python -m``).
OWN_LOGGERS = ("__main__", "pipelines", "components", "models", "serving")


def configure_logging() -> None:
    """Libraries at WARNING (TorchRec's planner and FBGEMM print every table at INFO), the
    project's own packages at INFO, one line format. The same in the driver and in every Ray
    worker that builds a model (``pipelines.train_loop``)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Importing fbgemm_gpu (via torchrec) calls logging.info, whose implicit basicConfig()
        # installs a default handler and would turn the call below into a no-op.
        if type(handler) is logging.StreamHandler and getattr(handler.formatter, "_fmt", None) == logging.BASIC_FORMAT:
            root.removeHandler(handler)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.WARNING)  # basicConfig leaves the level of a root that already had handlers
    quiet_libraries()
    for package in OWN_LOGGERS:
        logging.getLogger(package).setLevel(logging.INFO)


def pipeline_main(
    prog: str,
    description: str,
    argv: list[str] | None,
    body: Callable[[PipelineConfig, argparse.Namespace], int],
    *,
    default_preset: str | None = None,
    failures: tuple[type[Exception], ...] = (),
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse, configure logging, load the config and run ``body(config, args)``.

    ``failures`` are the project's own error types that mean "the run failed" (exit 1,
    one line on stderr, no traceback).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}", description=description, epilog="Any other --section.key=value overrides the preset."
    )
    parser.add_argument("--config", default=default_preset, help="preset name (pipelines/configs) or YAML path")
    if add_arguments is not None:
        add_arguments(parser)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    configure_logging()
    name = prog.rsplit(".", 1)[-1]
    try:
        return body(load_config(PipelineConfig, args.config, overrides), args)
    except ConfigError as exc:
        print(f"{name}: config error: {exc}", file=sys.stderr)
        return 2
    except failures as exc:
        print(f"{name}: failed: {exc}", file=sys.stderr)
        return 1
