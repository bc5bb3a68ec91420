"""One experiment setup for the benchmark scripts that measure a served artifact: the options they share,
what those resolve to, and where results go.

    --artifact DIR   the artifact (default: the bundled all-MiniLM-L6-v2, exported as `serve` would)
    --variant V      the variant (default: the one `embedline serve` picks for it on this machine)
    --threads N      cores the experiment's servers or engines use (default 2)
    --rounds N       alternating rounds (each script that has rounds gives its own default)
    --no-readme      leave benchmarks/README.md as it is

A script declares its own options in `options(parser)` and gets an `Experiment`:

    experiment = Experiment.from_command_line(__doc__, rounds=6, options=lambda p: p.add_argument(...))
    ...
    experiment.save("engine_layout_openvino", experiment.record(median=...))  # benchmarks/results/NAME.json
    experiment.report("engine_layout", markdown)          # the README section, unless --no-readme
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, cpu_flags, load_average, save_results, update_readme_section


@dataclass
class Experiment:
    args: argparse.Namespace  # every option, the script's own included
    artifact: Any  # embedline.artifact.Artifact
    variant: str
    threads: int
    rounds: int | None  # None: the experiment has no rounds
    load_before: list[float]

    @classmethod
    def from_command_line(cls, description: str, *, rounds: int | None = None, threads: int = 2,
                          one_variant: bool = True,
                          options: Callable[[argparse.ArgumentParser], None] | None = None,
                          argv: list[str] | None = None) -> Experiment:
        parser = argparse.ArgumentParser(description=description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--artifact", default=None, help="artifact directory (default: the bundled model's)")
        if one_variant:  # experiments that measure every engine take no --variant
            parser.add_argument("--variant", default=None,
                                help="variant (default: the one `embedline serve` picks on this machine)")
        parser.add_argument("--threads", type=int, default=threads, help="cores the experiment uses")
        if rounds is not None:
            parser.add_argument("--rounds", type=int, default=rounds, help="alternating rounds")
        parser.add_argument("--no-readme", action="store_true", help="leave benchmarks/README.md as it is")
        if options is not None:
            options(parser)
        args = parser.parse_args(argv)
        from embedline.serving.launcher import prepare_artifact
        from embedline.variants import choose_variant

        artifact = prepare_artifact(args.artifact)
        variant = getattr(args, "variant", None) or choose_variant(artifact, "cpu")
        args.variant = variant
        return cls(args, artifact, variant, args.threads, getattr(args, "rounds", None), load_average())

    def record(self, **results: Any) -> dict[str, Any]:
        """`results` with the conditions they were measured under: artifact, variant, threads, CPU flags,
        the load average before and after, and the command that ran."""
        return {"artifact": self.artifact.name, "variant": self.variant, "threads": self.threads, **results,
                "cpu_flags": cpu_flags(), "load_before": self.load_before, "load_after": load_average(),
                "command": command_line()}

    def save(self, name: str, record: dict[str, Any]) -> Path:
        """benchmarks/results/NAME.json (with the machine), from `record(...)`."""
        path = save_results(name, record)
        print(f"saved {path}")
        return path

    def report(self, section: str, markdown: str) -> None:
        """Rewrite this experiment's section of benchmarks/README.md, unless --no-readme."""
        if not self.args.no_readme:
            update_readme_section(section, markdown)
