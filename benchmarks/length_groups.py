"""Length groups: the largest engine run (`length_group_size`) `embedline serve` gives a variant
(`serving/settings.py: group_size_for`) against the other size, 32 or 64 texts.

The SDK cuts a long list into requests of one group each, so the group size also sets a corpus call's
request size (and, through it, the requests in flight). Two servers of the same artifact and variant run
side by side, measured in alternating rounds (`benchmarks/side_by_side.py`) over the suite's short texts,
the workload of its corpus stage.

    .venv/bin/python -m benchmarks.length_groups [--artifact DIR] [--variant openvino] [--rounds 12]

Writes benchmarks/results/length_groups_VARIANT.json, and the "length_groups" table in benchmarks/README.md
from every such file.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.experiment import Experiment
from benchmarks.side_by_side import compare, readme_table

SIZES = (32, 64)


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, rounds=12)
    from benchmarks.common import measured_settings
    from benchmarks.workloads import build_workloads

    artifact = experiment.artifact
    short = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, names=("short",))["short"]
    served = measured_settings(experiment.variant, experiment.threads)  # what `embedline serve` runs here
    sizes = {f"groups of {size}": replace(served, length_group_size=size) for size in SIZES}
    compare("length_groups", experiment, sizes, f"groups of {served.group_size}", list(short.texts), short.tokens)
    experiment.report("length_groups", readme_section())


def readme_section() -> str:
    return ("## Length groups: 32 or 64 texts per engine run\n\n" + readme_table("length_groups", "largest length group")
            + "\n\nThe SDK sends requests of one group each, so the corpus call's plan follows the group size; the "
            "closed loop's requests are 32 texts either way. `embedline serve` takes the size from "
            "`serving/settings.py: group_size_for`.")


if __name__ == "__main__":
    main()
