"""The `embedline` command: one verb per stage of the pipeline.

Each verb lives in the module that does the work; that module defines `configure(parser)` and
`run(args) -> int`. Only the chosen verb's module is imported, so `embedline embed` needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from embedline.errors import EmbedlineError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "export": ("embedline.export.cli", "import a model into an artifact and export its ONNX variants"),
    "build-repo": ("embedline.serving.repository", "build a Triton model repository from an artifact"),
    "serve": ("embedline.serving.launcher", "serve an artifact's models with Triton Inference Server"),
    "publish": ("embedline.serving.publish", "roll a `serve --watch` server to a new version of an artifact"),
    "embed": ("embedline.client.cli", "embed texts (one per line) through a running server"),
    "classify": ("embedline.client.cli_classify", "classify texts (one per line) through a running server"),
    "index": ("embedline.search.indexer", "embed a corpus file through a running server into a search collection"),
    "index-ray": ("embedline.search.ray_job", "embed Parquet shards on many replicas with Ray Data and load them into a store"),
    "eval-retrieval": ("embedline.search.evaluate", "nDCG@10, recall@100, MRR@10 of a served index on queries + qrels"),
    "train": ("embedline.training.simcse.cli", "train a sentence encoder with SimCSE or another contrastive loss"),
    "eval-sts": ("embedline.training.evaluate", "STS Spearman of an artifact on a TSV file"),
    "train-classifier": ("embedline.training.fewshot.classifier", "few-shot classifier: contrastive body + head"),
    "plot-space": ("embedline.training.diagnostics.plot_space", "2-D picture of an artifact's embedding space by label"),
    "diagnose": ("embedline.training.diagnostics.diagnose", "report on an embedding space: measures and named pathologies"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedline",
        description="Contrastive sentence embeddings from training to Triton serving.",
        epilog="Run `embedline VERB --help` for a verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"embedline {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from embedline import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    verb, rest = argv[0], argv[1:]
    module_name, help_text = VERBS[verb]
    # Our own progress at INFO; third-party libraries (ORT's quantizer logs every tensor) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedline").setLevel(logging.INFO)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"embedline {verb}: needs a package that is not installed ({exc}); "
              "install the matching extra, e.g. pip install 'embedline[serve,export,train]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"embedline {verb}", description=help_text)
    module.configure(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except EmbedlineError as exc:
        print(f"embedline {verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"embedline {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
