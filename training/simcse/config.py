"""The training configuration: one frozen dataclass, `--key=value` overrides, resolution of "auto" values.

Every field can be set from the command line (`embedline train --lr=1e-4`); an unknown key is an error
listing the valid ones. `resolve_config` turns the "auto" defaults into concrete values (the base
model's pooling, the paper's learning rate for the objective, the device and precision), and that
resolved config is what checkpoints and the final artifact's `embedline.json` record.

`--matryoshka_dims=384,256,128,64` trains for truncation (Matryoshka Representation Learning): each dim
must be in 1..the model's dimension and appear once; resolution sorts them largest first and adds the
model's full dimension when it is missing.

`--objective retrieval` trains a dual encoder on (query, relevant passage) pairs read from `--corpus`,
`--queries` and `--qrels` (the DPR recipe; training/simcse/retrieval.py), selected by nDCG@10 on
`--dev_queries` / `--dev_qrels`; its fields are rejected with the other objectives, and theirs
(`--train_file`, `--dev_file`) with it.

Defaults follow SimCSE (Gao, Yao & Chen, EMNLP 2021): temperature 0.05, max_seq_length 32, batch 64,
lr 3e-5 unsupervised / 5e-5 supervised, one epoch, no warmup, [CLS] with an MLP during training for
plain BERT models. The paper's supervised runs used batch 512: `--batch_size=512 --mini_batch_size=64`
does that in fixed memory with the cached loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from embedline import artifact as art
from embedline.errors import EmbedlineError
from embedline.retrieval import PASSAGE_PROMPTS, QUERY_PROMPT
from embedline.training.retrieval_data import resolve_title_field

OBJECTIVES = ("unsup", "sup", "triplet", "contrastive", "cosine", "supcon", "retrieval")
# cls = [CLS] + SimCSE's MLP during training only; cls_no_mlp = [CLS] throughout; auto = the base model's.
POOLINGS = ("auto", "cls", "cls_no_mlp", "mean")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Objectives whose negatives are the other examples of the batch (they need >= 2 distinct sentences).
IN_BATCH_OBJECTIVES = ("unsup", "sup", "supcon", "retrieval")
# retrieval: DPR's 2e-5 (Karpukhin et al. 2020), also sentence-transformers' default for fine-tuning.
PAPER_LR = {"unsup": 3e-5, "sup": 5e-5, "triplet": 5e-5, "contrastive": 5e-5, "cosine": 5e-5,
            "supcon": 5e-5, "retrieval": 2e-5}
# Where retrieval's hard negatives come from (training/simcse/mining.py).
NEGATIVE_SOURCES = ("none", "bm25", "self", "bm25+self")
# The fields only the retrieval objective reads (the others reject them), and the sentence objectives' files.
RETRIEVAL_FILES = ("corpus", "queries", "qrels", "dev_queries", "dev_qrels")
SENTENCE_FILES = ("train_file", "dev_file")
# Text fields taken as given: a prompt's trailing space ("query: ") is part of it.
VERBATIM_FIELDS = ("query_prompt", "passage_prompt")
# max_seq_length 0 (auto): SimCSE's 32 for sentences; for retrieval passages, the base model's, at most this.
RETRIEVAL_MAX_SEQ_LENGTH = 256


class ConfigError(EmbedlineError):
    """An unknown key, a value of the wrong type, or an inconsistent combination of settings."""


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A config field with its help text and any other option metadata, read by the verb that builds its
    command-line options from the dataclass (`embedline train --help`, `embedline train-classifier --help`)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Empty strings and None mean "auto" until resolved."""

    # Data, model and output.
    objective: str = option("unsup", "unsup, sup, triplet, contrastive, cosine, supcon or retrieval")
    model: str = option("", "artifact or sentence-transformers / HF directory; '' = bundled all-MiniLM-L6-v2")
    train_file: str = option("", "unsup: text, one sentence a line; others: CSV sent0,sent1[,hard_neg|label] "
                            "(supcon: label = class id)")
    dev_file: str = option("", "STS TSV (score + two sentences) evaluated every eval_steps; '' = none")
    output: str = option("", "the artifact directory to write; its run/ folder holds metrics, plot, checkpoints")
    name: str = option("", "artifact name; '' = the output directory's name")

    # Retrieval (--objective retrieval): a dual encoder on (query, relevant passage) pairs.
    corpus: str = option("", "retrieval: the passages, a corpus file as `embedline index` reads it (id, [title,] text)")
    queries: str = option("", "retrieval: training queries (query_id, text); queries without qrels are skipped")
    qrels: str = option("", "retrieval: training judgments (query_id, doc_id, score; > 0 = relevant)")
    dev_queries: str = option("", "retrieval: dev queries, the best step by their nDCG@10; '' = none (last step)")
    dev_qrels: str = option("", "retrieval: the dev queries' judgments")
    title_field: str = option("auto", "retrieval: corpus column joined as title + ' ' + text (as `index "
                              "--title-field`); auto = 'title' when the corpus has one; '' = none")
    query_prompt: str = option("", "retrieval: text prepended to queries, recorded as the artifact's 'query' "
                               "prompt; '' = the base model's, if it has one")
    passage_prompt: str = option("", "retrieval: text prepended to passages, recorded as the 'passage' prompt; "
                                 "'' = the base model's, if it has one")
    negatives: str = option("bm25", "retrieval hard negatives: none, bm25, self (the model's own index, mined "
                            "again every refresh_steps: ANCE) or bm25+self")
    negatives_per_query: int = option(1, "retrieval: mined hard negatives per query in each batch")
    mine_depth: int = option(30, "retrieval: hard negatives are drawn from each query's top this many passages")
    refresh_steps: int = option(100, "retrieval, self negatives: re-embed the corpus and mine again every this "
                                "many steps; 0 = mine once, with the starting model")
    fn_margin: float | None = option(0.05, "retrieval false-negative guard: a mined negative whose cosine to the "
                                     "query is above the positive's minus this is not used; none = off")

    # Model.
    pooling: str = option("auto", "cls ([CLS] + SimCSE's train-only MLP), cls_no_mlp, mean; auto = the base model's")
    dropout: float | None = option(None, "dropout p; none = the model's own (0.1): the positive pair's noise in unsup")
    random_layers: bool = option(False, "fresh transformer layers, pretrained word embeddings kept")
    layers_config: str = option("", "config.json (or its directory) for the random layers; '' = the base model's")
    num_layers: int = option(0, "num_hidden_layers of the random layers; 0 = the config's")
    freeze_word_embeddings: bool = option(False, "keep the word embeddings fixed (with random_layers: all it knows)")

    # Objective.
    temperature: float = option(0.05, "InfoNCE / supcon temperature: scale = 1 / temperature")
    margin: float = option(0.5, "margin of the triplet and contrastive losses (cosine distance)")
    hard_negatives: bool = option(True, "sup: use the CSV's hard_neg column when it has one")
    matryoshka_dims: tuple[int, ...] = option(
        (), "comma list, e.g. 384,256,128,64: Matryoshka loss (the objective's loss averaged over these "
            "prefix sizes) so embeddings can be truncated; the model's dim is added; '' = off")

    # Optimization.
    lr: float | None = option(None, "peak learning rate; none = 3e-5 unsup, 2e-5 retrieval, 5e-5 otherwise")
    batch_size: int = option(64, "examples per optimizer step, summed over all processes")
    mini_batch_size: int = option(0, "> 0: cached (GradCache) loss encoding this many texts at a time")
    epochs: int = option(1, "passes over the training file (the last partial batch is dropped)")
    max_steps: int = option(0, "> 0: this many optimizer steps instead of epochs")
    warmup_ratio: float = option(0.0, "share of the steps with linear warmup (then linear decay to 0)")
    weight_decay: float = option(0.0, "AdamW weight decay on weight matrices")
    max_grad_norm: float = option(1.0, "gradient clipping norm; <= 0 disables it")
    max_seq_length: int = option(0, "training truncation; 0 = 32 (retrieval: the base model's, at most 256); "
                                 "the artifact keeps the base model's inference length")
    precision: str = option("auto", "fp32, bf16 or fp16 autocast; auto = bf16 (else fp16) on GPU, fp32 on CPU")
    seed: int = option(42, "seeds initialization, dropout and the batch order")
    device: str = option("auto", "cpu, cuda, cuda:N; auto = cuda when available")

    # Evaluation, logging, checkpoints.
    eval_steps: int = option(125, "evaluate on dev_file every this many steps (and at the start and the end)")
    eval_batch_size: int = option(128, "texts per batch when evaluating")
    log_steps: int = option(10, "write loss, lr and sentences/s to run/metrics.jsonl every this many steps")
    checkpoint_steps: int = option(500, "save a resumable checkpoint every this many steps; 0 = only when stopped")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


_TYPES = typing.get_type_hints(TrainConfig)


def _unknown_keys(keys: list[str]) -> ConfigError:
    return ConfigError(f"unknown training config key(s) {', '.join(keys)}; valid keys: {', '.join(field_names())}")


# --- The command-line options: one per field ---------------------------------------------------------------

_DEST = "config__"  # argparse dest prefix of config fields


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, `--batch_size=128` or `--batch-size 128`: `embedline train`'s list.

    Values stay strings (default None: not given) until `apply_overrides` converts and checks them.
    """
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flags = [f"--{field.name}"]
        if "_" in field.name:
            flags.append(f"--{field.name.replace('_', '-')}")
        kind = getattr(_TYPES[field.name], "__name__", str(_TYPES[field.name]))
        help_text = f"{field.metadata['help']} ({kind}, default {getattr(defaults, field.name)!r})"
        parser.add_argument(*flags, dest=_DEST + field.name, default=None, metavar="VALUE", help=help_text)


def given_options(args: argparse.Namespace) -> dict[str, str]:
    """{field: value} of the options `add_options` declared that the command line gave."""
    return {
        name[len(_DEST):]: value for name, value in vars(args).items()
        if name.startswith(_DEST) and value is not None
    }


def parse_overrides(args: list[str]) -> dict[str, str]:
    """["--lr=1e-4", "--batch-size", "32"] -> {"lr": "1e-4", "batch_size": "32"}, read with `add_options`.

    For scripts that take training-config fields beside their own options; an unknown or malformed
    option is a ConfigError.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_options(parser)

    def error(message: str) -> NoReturn:
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    known, unknown = parser.parse_known_args(args)
    if unknown:
        # Name the keys ("--learning-rate 1e-4" -> learning-rate), not the values that followed them.
        keys = [arg[2:].partition("=")[0] for arg in unknown if arg.startswith("--")]
        raise _unknown_keys(keys or unknown)
    return given_options(known)


# --- Values ------------------------------------------------------------------------------------------------


def _parse_ints(key: str, raw: Any) -> tuple[int, ...]:
    """A tuple-of-ints field: "384,256,128" (or "" / "none": empty) from the command line, or a list/tuple
    of ints (a config or checkpoint read back from JSON)."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in ("", "none", "off"):
            return ()
        items: Any = [item.strip() for item in text.split(",")]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise ConfigError(f"--{key}: expected a comma-separated list of integers, got {raw!r}")
    values = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ConfigError(f"--{key}={raw}: expected a comma-separated list of integers")
        try:
            values.append(int(item))
        except ValueError:
            raise ConfigError(
                f"--{key}={raw}: expected a comma-separated list of integers, {item!r} is not one"
            ) from None
    return tuple(values)


def _parse_value(key: str, raw: Any) -> Any:
    """Convert one override (a string from the command line, or a Python value) to the field's type."""
    kind = _TYPES[key]
    if typing.get_origin(kind) is tuple:
        return _parse_ints(key, raw)
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "auto", "")):
            return None
    if not isinstance(raw, str):
        raw_ok = isinstance(raw, kind) or (kind is float and isinstance(raw, int) and not isinstance(raw, bool))
        if not raw_ok:
            raise ConfigError(f"--{key}: expected {kind.__name__}, got {raw!r}")
        return kind(raw)
    if kind is str and key in VERBATIM_FIELDS:
        return raw
    text = raw.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{key}={raw}: expected {kind.__name__}") from None


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with `overrides` ({key: value}, values may be strings) applied and checked."""
    unknown = sorted(k for k in overrides if k.replace("-", "_") not in field_names())
    if unknown:
        raise _unknown_keys(unknown)
    values = {k.replace("-", "_"): _parse_value(k.replace("-", "_"), v) for k, v in overrides.items()}
    return validate(dataclasses.replace(config, **values))


def validate(config: TrainConfig) -> TrainConfig:
    """Reject values that cannot work, with the key in the message."""
    checks = [
        (config.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}"),
        (config.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}"),
        (config.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
        (config.temperature > 0, "--temperature must be > 0"),
        (config.margin >= 0, "--margin must be >= 0"),
        (config.dropout is None or 0.0 <= config.dropout < 1.0, "--dropout must be in [0, 1)"),
        (config.lr is None or config.lr > 0, "--lr must be > 0"),
        (config.batch_size >= 1, "--batch_size must be >= 1"),
        (config.mini_batch_size >= 0, "--mini_batch_size must be >= 0"),
        (config.epochs >= 1, "--epochs must be >= 1"),
        (config.max_steps >= 0, "--max_steps must be >= 0"),
        (0.0 <= config.warmup_ratio < 1.0, "--warmup_ratio must be in [0, 1)"),
        (config.weight_decay >= 0, "--weight_decay must be >= 0"),
        (config.max_seq_length == 0 or config.max_seq_length >= 2,
         "--max_seq_length must be >= 2 ([CLS] and [SEP]), or 0 (auto)"),
        (config.num_layers >= 0, "--num_layers must be >= 0"),
        (config.eval_steps >= 1 and config.log_steps >= 1, "--eval_steps and --log_steps must be >= 1"),
        (config.eval_batch_size >= 1, "--eval_batch_size must be >= 1"),
        (config.checkpoint_steps >= 0, "--checkpoint_steps must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_matryoshka_dims(config.matryoshka_dims)
    _check_objective_files(config)
    if config.objective == "retrieval":
        _check_retrieval(config)
    if config.objective in IN_BATCH_OBJECTIVES and config.batch_size < 2:
        raise ConfigError(f"--batch_size must be >= 2 for {config.objective}: the other examples are the negatives")
    return config


def _check_objective_files(config: TrainConfig) -> None:
    """Each objective's input files only: a retrieval file given to a sentence objective (or the reverse) would
    be silently ignored, which is never what the user meant."""
    own, others = (RETRIEVAL_FILES, SENTENCE_FILES) if config.objective == "retrieval" else (
        SENTENCE_FILES, RETRIEVAL_FILES)
    given = [f"--{key}" for key in others if getattr(config, key)]
    if given:
        reads = ", ".join(f"--{key}" for key in own)
        raise ConfigError(f"{', '.join(given)}: not read by --objective {config.objective}, which reads {reads}")


def _check_retrieval(config: TrainConfig) -> None:
    checks = [
        (config.negatives in NEGATIVE_SOURCES, f"--negatives must be one of {', '.join(NEGATIVE_SOURCES)}"),
        (config.negatives_per_query >= 1, "--negatives_per_query must be >= 1 (--negatives=none for none)"),
        (config.mine_depth >= config.negatives_per_query,
         "--mine_depth must be >= --negatives_per_query (negatives are drawn from the top mine_depth)"),
        (config.refresh_steps >= 0, "--refresh_steps must be >= 0"),
        (config.fn_margin is None or 0.0 <= config.fn_margin <= 2.0,
         "--fn_margin must be in [0, 2] (a cosine margin), or none to turn the guard's margin off"),
        (bool(config.dev_queries) == bool(config.dev_qrels), "--dev_queries and --dev_qrels go together"),
        (not config.matryoshka_dims, "--matryoshka_dims is not supported with --objective retrieval yet"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_matryoshka_dims(dims: tuple[int, ...] | list[int], model_dim: int | None = None) -> None:
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ConfigError(f"--matryoshka_dims must be a tuple of integers, got {dims!r}")
    bad = [d for d in dims if d < 1 or (model_dim is not None and d > model_dim)]
    if bad:
        upper = f"the model's dimension {model_dim}" if model_dim is not None else "the model's dimension"
        raise ConfigError(f"--matryoshka_dims: {', '.join(map(str, bad))} not in 1..{upper}")
    repeated = sorted({d for d in dims if list(dims).count(d) > 1})
    if repeated:
        raise ConfigError(f"--matryoshka_dims: {', '.join(map(str, repeated))} given more than once")


def resolve_matryoshka_dims(dims: tuple[int, ...], model_dim: int) -> tuple[int, ...]:
    """The dims as training uses them: checked against the model's dimension, largest first, the full
    dimension included (added when missing); () stays () (no Matryoshka loss)."""
    _check_matryoshka_dims(dims, model_dim)
    if not dims:
        return ()
    return tuple(sorted(set(dims) | {model_dim}, reverse=True))


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill every "auto" value, so the config alone describes the run. Pure: reads files, loads no model."""
    import torch

    validate(config)
    if not config.output:
        raise ConfigError("--output is required (the artifact directory to write)")
    model_path, _ = art.resolve_model_source(config.model or None)
    base = art.describe_source(model_path)
    base_pooling = base["pooling"]
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = config.precision
    if precision == "auto":
        if device.startswith("cuda"):
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    output = Path(config.output).expanduser().resolve()
    files = _resolve_retrieval(config, model_path, base) if config.objective == "retrieval" else _resolve_sentences(
        config)
    return dataclasses.replace(
        config,
        **files,
        model=str(model_path),
        output=str(output),
        name=config.name or output.name,
        pooling=base_pooling if config.pooling == "auto" else config.pooling,
        lr=config.lr if config.lr is not None else PAPER_LR[config.objective],
        device=device,
        precision=precision,
        matryoshka_dims=resolve_matryoshka_dims(config.matryoshka_dims, int(base["dim"])),
    )


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def _resolve_sentences(config: TrainConfig) -> dict[str, Any]:
    if not config.train_file:
        raise ConfigError("--train_file is required")
    return {"train_file": _absolute(config.train_file), "dev_file": _absolute(config.dev_file),
            "max_seq_length": config.max_seq_length or 32}


def _resolve_retrieval(config: TrainConfig, model_path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """The retrieval files as absolute paths, the corpus's title column, the prompts (the base model's when not
    given: a model trained with "query: " prefixes keeps them) and the training length."""
    missing = [f"--{key}" for key in ("corpus", "queries", "qrels") if not getattr(config, key)]
    if missing:
        raise ConfigError(f"--objective retrieval needs {', '.join(missing)}")
    title_field = resolve_title_field(config.corpus, config.title_field)
    prompts_file = model_path / art.PROMPTS_FILE
    base_prompts = (art.read_json(prompts_file).get("prompts") or {}) if prompts_file.is_file() else {}
    passage_name = next((name for name in PASSAGE_PROMPTS if name in base_prompts), None)
    return {
        **{key: _absolute(getattr(config, key)) for key in RETRIEVAL_FILES},
        "title_field": title_field,
        "query_prompt": config.query_prompt or base_prompts.get(QUERY_PROMPT, ""),
        "passage_prompt": config.passage_prompt or (base_prompts[passage_name] if passage_name else ""),
        "max_seq_length": config.max_seq_length or min(RETRIEVAL_MAX_SEQ_LENGTH, int(base["max_seq_length"])),
    }


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """The inverse of `to_dict` (e.g. a checkpoint's config); unknown keys are an error."""
    return apply_overrides(TrainConfig(), values)
