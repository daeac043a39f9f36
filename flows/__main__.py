"""`python -m flows --config C [--profile P] [section.key=value ...]`: the pipeline from a shell.

`eagle3 pipeline` runs this in a child process, so that the library (eagle3/) never imports its
orchestration layer. The stack's variables are applied before Prefect is imported (Prefect reads
its settings once, at import): that is why flows.pipeline is imported only inside `main`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from eagle3 import cli
    from eagle3.env import disable_telemetry

    disable_telemetry()
    ap = argparse.ArgumentParser(
        prog="python -m flows", description="Prefect pipeline: data -> train -> evaluate -> promote"
    )
    cli.add_recipe_args(ap)
    return cli.run_command("eagle3 pipeline", _pipeline, ap.parse_args(argv))


def _pipeline(args) -> int:
    from eagle3 import cli

    recipe = cli.recipe_from_args(args)
    cli.use_stack(recipe)  # again: `python -m flows` may be run by hand
    from flows.pipeline import pipeline_from_cli

    return pipeline_from_cli(recipe, args)


if __name__ == "__main__":
    sys.exit(main())
