"""Reliability table: what an adversarial user tries, and how often the package answers right.

    python benchmarks/reliability.py [--quick] [--output benchmarks/results/reliability.json]

Runs every check of the three reliability modules beside this script and prints one JSON object: per category,
how many cases were tried, answered correctly and answered wrongly (with a short description of each wrong case).

* images (`reliability_images.py`): image modes through every entry point, bad files;
* models and training (`reliability_training.py`): malformed tensors, NaN paths, kills during training;
* Hub server (`reliability_server.py`): access control, path traversal, malformed commits, concurrent commits on
  one and two servers, concurrent downloads checked by sha256, kill -9 during commit storms.

`--quick` runs a trimmed set (the test suite runs it); the committed table is a full run. Exit status 1 when any
case was answered wrongly.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from reliability_images import image_checks
from reliability_server import server_checks
from reliability_training import training_checks

from prg_hub.run_records import describe_machine

CHECKS = {"images": image_checks, "models and training": training_checks, "Hub server": server_checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A trimmed run (well under a few minutes on 2 cores).")
    parser.add_argument("--output", help="Also write the JSON object to this file.")
    args = parser.parse_args(argv)

    categories, seconds = {}, {}
    for area, checks in CHECKS.items():
        started = time.perf_counter()
        categories.update(checks(args.quick))
        seconds[area] = round(time.perf_counter() - started, 1)
    totals = {key: sum(category[key] for category in categories.values()) for key in ("tried", "correct", "wrong")}
    result = {
        "categories": categories,
        "total": totals,
        "seconds": seconds,
        "quick": args.quick,
        "machine": describe_machine(),
        "command": shlex.join(["python", "benchmarks/reliability.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 1 if totals["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
