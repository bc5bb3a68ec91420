"""Engine layout: one instance using every core against the layout `embedline serve` runs (two instances
sharing the cores, `serving/settings.py: engine_layout`), for one variant.

Two servers of the same artifact and variant run side by side, one per layout, measured in alternating
rounds over STS-B sentences (`benchmarks/side_by_side.py`). `engine_layout` takes its defaults from here.

    .venv/bin/python -m benchmarks.engine_layout [--artifact DIR] [--variant openvino] [--rounds 6]

Writes benchmarks/results/engine_layout_VARIANT.json, and the "engine_layout" table in benchmarks/README.md from
every such file.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.common import measured_settings, sts_sentences
from benchmarks.experiment import Experiment
from benchmarks.side_by_side import compare, readme_table


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, rounds=6, options=lambda parser: parser.add_argument(
        "--texts", type=int, default=2000, help="texts in one corpus call (STS-B sentences)"))
    import numpy as np

    texts = sts_sentences(experiment.args.texts)
    tokens = np.array([len(t.split()) for t in texts])
    threads = experiment.threads
    served = measured_settings(experiment.variant, threads)  # what `embedline serve` runs on these cores
    one = f"1 instance x {threads} threads"
    shared = f"{served.instances} instances x {served.intra_op_threads} thread{'s' if served.intra_op_threads > 1 else ''}"
    layouts = {one: replace(served, instances=1, intra_op_threads=threads), shared: served}
    compare("engine_layout", experiment, layouts, shared, texts, tokens)
    experiment.report("engine_layout", readme_section())


def readme_section() -> str:
    return ("## Engine layout: one instance on every core, or two on half each\n\n"
            + readme_table("engine_layout", "layout")
            + "\n\n`embedline serve` runs two instances on a CPU (`serving/settings.py: engine_layout`).")


if __name__ == "__main__":
    main()
