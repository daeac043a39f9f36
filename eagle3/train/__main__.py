"""`torchrun --nproc-per-node N -m eagle3.train --config C [section.key=value ...]`.

Every process runs the same recipe; rank 0 writes the checkpoint and the metrics.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from eagle3.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
