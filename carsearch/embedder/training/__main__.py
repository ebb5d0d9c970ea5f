"""``python -m carsearch.embedder.training {train,export} ...`` until ``carsearch train/export`` exist."""

from __future__ import annotations

import logging
import sys

from carsearch.embedder.training.run import export_main, train_main
from carsearch.errors import CarSearchError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "export": export_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m carsearch.embedder.training {train,export} ...", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return commands[argv[0]](argv[1:])
    except CarSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
