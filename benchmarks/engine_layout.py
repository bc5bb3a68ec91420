"""Engine layout: one instance using every core against the layout `embedline serve` runs (two instances
sharing the cores, `serving/settings.py: engine_layout`), for one variant.

Two servers of the same artifact and variant run side by side, one per layout, measured in alternating
rounds over STS-B sentences (`benchmarks/side_by_side.py`). `engine_layout` takes its defaults from here.

    .venv/bin/python -m benchmarks.engine_layout [--artifact DIR] [--variant openvino] [--rounds 6]

Writes benchmarks/results/engine_layout_VARIANT.json, and the "engine_layout" table in benchmarks/README.md from
every such file.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from benchmarks.common import sts_sentences, update_readme_section
from benchmarks.side_by_side import compare, readme_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None, help="artifact directory (default: the bundled model's)")
    parser.add_argument("--variant", default="openvino")
    parser.add_argument("--threads", type=int, default=2, help="cores both layouts share")
    parser.add_argument("--texts", type=int, default=2000, help="texts in one corpus call (STS-B sentences)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from embedline.serving.launcher import prepare_artifact
    from embedline.serving.settings import served_settings

    artifact = prepare_artifact(args.artifact)
    texts = sts_sentences(args.texts)
    tokens = np.array([len(t.split()) for t in texts])
    served = served_settings(args.variant, args.threads)  # what `embedline serve` runs on these cores
    one = f"1 instance x {args.threads} threads"
    shared = f"{served.instances} instances x {served.intra_op_threads} thread{'s' if served.intra_op_threads > 1 else ''}"
    layouts = {one: replace(served, instances=1, intra_op_threads=args.threads), shared: served}
    path = compare("engine_layout", artifact, args, layouts, shared, texts, tokens)
    print(f"saved {path}")
    if not args.no_readme:
        update_readme_section("engine_layout", readme_section())


def readme_section() -> str:
    return ("## Engine layout: one instance on every core, or two on half each\n\n"
            + readme_table("engine_layout", "layout")
            + "\n\n`embedline serve` runs two instances on a CPU (`serving/settings.py: engine_layout`).")


if __name__ == "__main__":
    main()
