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

import argparse
from dataclasses import replace

from benchmarks.common import update_readme_section
from benchmarks.side_by_side import compare, readme_table

SIZES = (32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None, help="artifact directory (default: the bundled model's)")
    parser.add_argument("--variant", default="openvino")
    parser.add_argument("--threads", type=int, default=2, help="cores both servers share")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()

    from embedline.serving.launcher import prepare_artifact
    from embedline.serving.settings import served_settings

    from benchmarks.workloads import build_workloads

    artifact = prepare_artifact(args.artifact)
    short = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, names=("short",))["short"]
    served = served_settings(args.variant, args.threads)  # what `embedline serve` runs on these cores
    sizes = {f"groups of {size}": replace(served, length_group_size=size) for size in SIZES}
    path = compare("length_groups", artifact, args, sizes, f"groups of {served.group_size}",
                   list(short.texts), short.tokens)
    print(f"saved {path}")
    if not args.no_readme:
        update_readme_section("length_groups", readme_section())


def readme_section() -> str:
    return ("## Length groups: 32 or 64 texts per engine run\n\n" + readme_table("length_groups", "largest length group")
            + "\n\nThe SDK sends requests of one group each, so the corpus call's plan follows the group size; the "
            "closed loop's requests are 32 texts either way. `embedline serve` takes the size from "
            "`serving/settings.py: group_size_for`.")


if __name__ == "__main__":
    main()
