"""Few-shot text classification the SetFit way (Tunstall et al. 2022); the `embedline train-classifier` verb.

    embedline train-classifier --train-file train.tsv --output my-classifier [--model DIR]
                               [--shots 8] [--seed 42] [--frozen-body] [--loss contrastive|triplet|sup]
                               [--pairs-file pairs.tsv [--pairs-weight 1.0]] [--hard-schedule constant|linear]

Stage 1, body (skipped with --frozen-body): contrastive fine-tuning of the encoder on examples drawn
from the labels (`pairs.py`: positives from the same label, negatives from other labels, a share of
them hard negatives mined with the starting encoder, positives and negatives balanced). The examples are
mixed with the rows of `--pairs-file` (user-written contrast pairs, `labeled_data.read_contrast_pairs`;
each row repeated round(pairs_weight x iterations) times, at least once, so at weight 1 a user row is
seen as often as each labelled example is visited as an anchor), written to `<output>/run/pairs.csv` and
trained by the SimCSE trainer (`trainer.train`, objective `contrastive`, `triplet` or `sup`): the same
loop, losses, schedule, logging and artifact writer.
With `--hard-schedule linear` the hard share rises from 0 to `--hard-fraction` along the examples, and
the CSV is laid out so that the trainer's (seeded, shuffled) first epoch visits them in that order
(`data.batch_indices`); it takes a single epoch (`--iterations` lengthens stage 1).
Stage 2, head: multinomial logistic regression on the normalized embeddings of the training texts
(`head.py`; the labelled training texts only: the user pairs are stage-1 data and never reach the head;
there is no dev split and no dev-based selection in either stage), stored as
`<output>/head/head.onnx` + `labels.json`, with the training embeddings and labels for neighbour
look-ups. The result is one artifact that serves `embed` and `classify`.

Why the pairwise contrastive loss by default (emotion validation split, 8 shots, seed 0, head C=10;
benchmarks/results/fewshot_dev_probe*.json): frozen body 37.8; pairs with margin 1.0, 10 rounds 38.7
(uniform negatives 38.4); pairs with margin 0.5, 20 rounds 33.5: most random negatives of a sentence
model already sit below cos 0.5 and give no gradient, so the positives' pull alone distorts the space;
InfoNCE (`sup`) 36.3: with few classes its in-batch negatives are mostly same-class texts. On 3 seeds
(benchmarks/README.md, few-shot candidates): SetFit's cosine loss is level with it, supervised contrastive
(`supcon`) below it, and the learning rate mattered more than either.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shutil
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedline import artifact as art
from embedline.errors import EmbedlineError
from embedline.encoder import load_encoder
from embedline.tokenization import load_tokenizer
from embedline.training.data import batch_indices, steps_per_epoch
from embedline.training.evaluate import embed_texts
from embedline.training.evaluate import load_any_encoder
from embedline.training.fewshot.head import choose_c, fit_head, save_head
from embedline.training.simcse.config import TrainConfig
from embedline.training.simcse.trainer import train
from embedline.training.simcse.config import option
from embedline.training.data import SIMILARITY_PAIR_OBJECTIVES, DataError, TrainingData
from embedline.training.labeled_data import (
    ContrastPairs, LabeledData, check_pair_labels, read_contrast_pairs, read_labeled, sample_shots,
)
from embedline.training.fewshot.pairs import (
    HARD_SCHEDULES, PairSettings, add_user_pairs, make_class_pairs, make_pairs, make_triples,
)

log = logging.getLogger(__name__)

LOSSES = ("contrastive", "cosine", "triplet", "sup", "supcon")
PAIRS_FILE = "pairs.csv"


class ClassifierConfigError(EmbedlineError):
    """An inconsistent classifier-training setting."""


# Option groups of `embedline train-classifier --help` (field metadata "group").
_BODY = "stage 1: contrastive body fine-tuning"
_HEAD = "stage 2: head"


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything a classifier run depends on; recorded in the artifact's embedline.json.

    Each field is an option of `embedline train-classifier` (`--train-file`, `--frozen-body`, ...).
    """

    train_file: str = option(help="TSV or CSV (optionally .gz) with columns text and label (string labels)")
    output: str = option(help="artifact directory to write")
    model: str = option("", "artifact or sentence-transformers directory to start from (default: bundled MiniLM)")
    name: str = option("", "artifact name (default: the output directory's name)")
    shots: int = option(0, "sample N examples per class with --seed; 0 = every row")
    seed: int = option(42, "seeds the sampling of shots, the stage-1 examples and training")

    # Stage 1: contrastive body fine-tuning.
    frozen_body: bool = option(False, "skip stage 1: head on the starting encoder", group=_BODY)
    loss: str = option("contrastive", "contrastive: balanced labelled pairs (a, b, y); cosine: the same pairs, "
                       "SetFit's (cos - y)^2; triplet / sup (InfoNCE): "
                       "(anchor, pos, neg); supcon: same-class pairs, every same-class text in the batch a "
                       "positive, the others negatives", group=_BODY, choices=LOSSES)
    iterations: int = option(PairSettings.iterations, "rounds of one positive + one negative per example "
                             "(SetFit's R)", group=_BODY)
    max_pairs: int = option(PairSettings.max_pairs, "cap on pairs/triples; 0 = iterations x examples x 2", group=_BODY)
    hard_fraction: float = option(PairSettings.hard_fraction, "share of negatives drawn among the closest "
                                  "other-label examples", group=_BODY)
    hard_pool: int = option(PairSettings.hard_pool, "how many closest other-label examples a hard negative is "
                            "drawn from", group=_BODY)
    hard_schedule: str = option(PairSettings.hard_schedule, "constant: --hard-fraction for every negative; "
                                "linear: the hard share rises from 0 to --hard-fraction over stage 1 (easy "
                                "first; one epoch)",
                                group=_BODY, choices=HARD_SCHEDULES)
    pairs_file: str = option("", "TSV or CSV of user-written contrast pairs for stage 1: columns anchor, positive, "
                             "negative, or text_a, text_b, same (1/0), optionally label (the anchor's class; "
                             "needed by --loss supcon); never used by the head", group=_BODY)
    pairs_weight: float = option(1.0, "each --pairs-file row enters stage 1 round(weight x iterations) times "
                                 "(at least once): 1 = as often as each labelled example is an anchor",
                                 group=_BODY)
    epochs: int = option(1, "passes over the stage-1 examples", group=_BODY)
    batch_size: int = option(16, "examples per optimizer step (at most the number of examples)", group=_BODY)
    # 5e-5, not SetFit's 2e-5: on the emotion and SST-5 validation splits (8 shots) every rate from 5e-5 to
    # 2e-4 beat 2e-5, as the body has to move further than 60-odd steps at 2e-5 take it; on banking77, whose
    # classes the starting space already separates, 1e-4 lost a point where 5e-5 kept it
    # (benchmarks/README.md, few-shot section).
    lr: float = option(5e-5, "peak learning rate", group=_BODY)
    warmup_ratio: float = option(0.1, "share of the steps with linear warmup", group=_BODY)
    # 1.0 keeps every negative pair with cos > 0 in the loss, as SetFit's cosine-similarity loss (target
    # cos 0) does; with 0.5 most random negatives of a sentence model (cos ~0.1-0.3) give no gradient and
    # the positives' pull alone reshapes the space.
    margin: float = option(1.0, "contrastive / triplet margin on the cosine distance", group=_BODY)
    temperature: float = option(0.05, "InfoNCE temperature (--loss sup, supcon)", group=_BODY)
    max_seq_length: int = option(64, "training truncation (the artifact keeps the base model's for inference)",
                                 group=_BODY)
    device: str = option("auto", "cpu, cuda, cuda:N; auto = cuda when available", group=_BODY)

    # Stage 2: head.
    # 10 beat SetFit's 1 on the emotion validation split for both frozen and fine-tuned bodies
    # (benchmarks/README.md, few-shot section).
    head_c: float = option(10.0, "inverse L2 regularization strength of the logistic regression (scikit-learn's C); "
                           "0 = chosen among 0.1, 1, 10, 100 by 4-fold cross-validation on the training examples",
                           group=_HEAD)
    class_weight: bool = option(True, "balanced class weights (a rare class counts as much as a common one)",
                                group=_HEAD)
    neighbours: int = option(5, "k nearest training examples returned with each prediction (0: store none)",
                             group=_HEAD)

    def validate(self) -> ClassifierConfig:
        checks = [
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (self.shots >= 0, "--shots must be >= 0"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.lr > 0, "--lr must be > 0"),
            (self.head_c >= 0, "--head-c must be > 0, or 0 to choose it by cross-validation"),
            (self.neighbours >= 0, "--neighbours must be >= 0"),
            (self.max_seq_length >= 2, "--max-seq-length must be >= 2"),
            (self.hard_schedule in HARD_SCHEDULES, f"--hard-schedule must be one of {', '.join(HARD_SCHEDULES)}"),
            (self.pairs_weight > 0, "--pairs-weight must be > 0"),
            (not (self.pairs_file and self.frozen_body),
             "--pairs-file trains the body: it cannot go with --frozen-body"),
            (not (self.hard_schedule != "constant" and self.loss == "supcon"),
             "--loss supcon draws no negatives (the batch's other classes are): --hard-schedule does not apply"),
            (self.hard_schedule == "constant" or self.frozen_body or self.epochs == 1,
             "--hard-schedule linear ramps over one pass: use --epochs 1 (--iterations lengthens stage 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ClassifierConfigError(message)
        self.pair_settings  # checks its own
        return self

    @property
    def pair_settings(self) -> PairSettings:
        return PairSettings(self.iterations, self.max_pairs, self.hard_fraction, self.hard_pool, self.hard_schedule)

    @property
    def pairs_repeats(self) -> int:
        """How many times each --pairs-file row enters stage 1."""
        return max(1, round(self.pairs_weight * self.iterations))


def load_examples(config: ClassifierConfig) -> LabeledData:
    """The training examples: the whole file, or `shots` per class sampled with `seed`."""
    data = read_labeled(config.train_file)
    if config.shots:
        data = sample_shots(data, config.shots, config.seed)
    log.info("training on %d examples: %s", len(data), json.dumps(data.counts()))
    return data


def _write_examples(path: Path, examples: TrainingData) -> Path:
    """The stage-1 examples as the trainer's CSV: sent0, sent1 and label (pairs) or hard_neg (triples)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled = examples.labels is not None
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*examples.column_names, "label"] if labelled else list(examples.column_names))
        for i, row in enumerate(zip(*examples.columns)):
            writer.writerow([*row, f"{examples.labels[i]:g}"] if labelled else list(row))
    return path


def _embed(encoder, tokenizer_json: Path, max_seq_length: int, texts: list[str]) -> np.ndarray:
    """(n, dim) float32 normalized embeddings with a torch encoder."""

    tokenizer = load_tokenizer(tokenizer_json, max_seq_length)
    return embed_texts(encoder, tokenizer, texts, batch_size=64).numpy()


def trainer_order(examples: TrainingData, batch_size: int, seed: int) -> TrainingData:
    """`examples` laid out so that the trainer's first epoch (`data.batch_indices` with this batch size and
    seed) visits them in their current order: row k goes to the file position the trainer reads k-th."""

    n = len(examples)
    visit = [i for step in range(steps_per_epoch(n, batch_size)) for i in batch_indices(n, batch_size, seed, step)]
    seen = set(visit)
    visit += [i for i in range(n) if i not in seen]  # the dropped partial batch: never trained on
    position = [0] * n
    for k, i in enumerate(visit):
        position[i] = k  # file row i holds the k-th example
    columns = tuple(tuple(column[position[i]] for i in range(n)) for column in examples.columns)
    labels = tuple(examples.labels[position[i]] for i in range(n)) if examples.labels is not None else None
    return dataclasses.replace(examples, columns=columns, labels=labels)


def stage1_examples(config: ClassifierConfig, data: LabeledData, embeddings: np.ndarray | None,
                    user_pairs: ContrastPairs | None = None) -> tuple[TrainingData, dict[str, Any]]:
    """Stage 1's examples (drawn from the labels, plus the user pairs) in the trainer's file order, and
    their record for embedline.json."""
    texts, labels = list(data.texts), list(data.labels)
    if config.loss in SIMILARITY_PAIR_OBJECTIVES:
        examples = make_pairs(texts, labels, embeddings, config.pair_settings, config.seed, data.path)
    elif config.loss == "supcon":
        examples = make_class_pairs(texts, labels, config.pair_settings, config.seed, data.path)
    else:
        examples = make_triples(texts, labels, embeddings, config.pair_settings, config.seed, data.path)
    drawn = len(examples)
    record: dict[str, Any] = {"drawn_examples": drawn, "hard_schedule": config.hard_schedule}
    if user_pairs is not None:
        columns, targets = user_pairs.columns, user_pairs.same
        if config.loss == "supcon":  # (anchor, positive) of the row's class; the batch supplies the negatives
            columns, targets = columns[:2], tuple(float(data.classes.index(label)) for label in user_pairs.labels)
        try:
            examples = add_user_pairs(examples, columns, targets, config.pairs_repeats, config.seed)
        except DataError as exc:
            raise ClassifierConfigError(f"{user_pairs.path}: {exc}") from None
        record["pairs_file"] = {"path": str(user_pairs.path), "rows": len(user_pairs),
                                "format": list(user_pairs.header),
                                "weight": config.pairs_weight, "repeats": config.pairs_repeats,
                                "examples": len(examples) - drawn,
                                "share": round((len(examples) - drawn) / len(examples), 4)}
        log.info("stage 1: %d user-written examples (%d rows x %d) among %d", len(examples) - drawn,
                 len(user_pairs), config.pairs_repeats, len(examples))
    if config.hard_schedule == "linear" and len(examples) >= 2:
        examples = trainer_order(examples, min(config.batch_size, len(examples)), config.seed)
    return examples, record


def train_body(config: ClassifierConfig, data: LabeledData, base: Path,
               user_pairs: ContrastPairs | None = None) -> tuple[art.Artifact, dict[str, Any]]:
    """Stage 1: mine examples with the starting encoder, then run the SimCSE trainer on them."""

    encoder, tokenizer_json, _ = load_any_encoder(base)
    embeddings = _embed(encoder, tokenizer_json, config.max_seq_length, list(data.texts))
    del encoder
    examples, record = stage1_examples(config, data, embeddings, user_pairs)
    if len(examples) < 2:
        raise ClassifierConfigError(f"{data.path}: too few examples for contrastive training ({len(examples)}); "
                                    "add examples or use --frozen-body")
    pairs_csv = _write_examples(Path(config.output) / "run" / PAIRS_FILE, examples)
    batch_size = min(config.batch_size, len(examples))
    base_pooling = art.describe_source(base)["pooling"]
    train_config = TrainConfig(
        objective=config.loss,
        model=str(base), train_file=str(pairs_csv), output=config.output, name=config.name,
        # [CLS] models train without SimCSE's MLP: the classifier uses the served embedding as is.
        pooling="cls_no_mlp" if base_pooling == "cls" else base_pooling,
        temperature=config.temperature, margin=config.margin, lr=config.lr, batch_size=batch_size,
        epochs=config.epochs, warmup_ratio=config.warmup_ratio, max_seq_length=config.max_seq_length,
        seed=config.seed, device=config.device, log_steps=5, checkpoint_steps=0,
    )
    log.info("stage 1: %d %s examples, batch %d, %d epoch(s)", len(examples), config.loss, batch_size, config.epochs)
    return train(train_config).artifact, record


def copy_body(config: ClassifierConfig, base: Path) -> art.Artifact:
    """Frozen body: the output artifact is the starting model as it is (its ONNX export kept)."""
    output = Path(config.output)
    if art.is_artifact(base):
        output.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base, output, dirs_exist_ok=True, ignore=shutil.ignore_patterns(art.HEAD_DIR, "run"))
        meta = dict(art.load_artifact(output).metadata)
        meta.update(name=config.name or output.name, base_model=str(base))
        art.write_json(output / art.METADATA_FILE, meta)
        return art.load_artifact(output)
    return art.import_model_dir(base, output, name=config.name or output.name)


def train_head(config: ClassifierConfig, data: LabeledData, body: art.Artifact) -> dict[str, Any]:
    """Stage 2: fit the head on the body's embeddings and write <artifact>/head/. Returns its record."""

    embeddings = _embed(load_encoder(body), body.tokenizer_path, body.max_seq_length, list(data.texts))
    c, cv_scores = config.head_c, None
    if c == 0:
        c, cv_scores = choose_c(embeddings, list(data.labels), data.classes, class_weight=config.class_weight)
    head = fit_head(embeddings, list(data.labels), data.classes, c=c, class_weight=config.class_weight)
    train_accuracy = float(np.mean(np.array(head.predict(embeddings)) == np.array(data.labels)))
    record = {"c": c, "cv_accuracy_by_c": cv_scores, "class_weight": "balanced" if config.class_weight else None,
              "train_accuracy": train_accuracy, "train_examples": len(data), "class_counts": data.counts(),
              "neighbours": config.neighbours}
    keep = config.neighbours > 0
    save_head(head, body.head_dir, train_embeddings=embeddings if keep else None,
              train_labels=list(data.labels) if keep else None, record=record)
    log.info("stage 2: head with %d labels, training accuracy %.3f", len(head.labels), train_accuracy)
    return record


def check_user_pairs(config: ClassifierConfig, data: LabeledData, pairs: ContrastPairs) -> None:
    """The pairs file fits the loss and the training file: its labels are training labels, and with
    --loss supcon every row names its class."""
    try:
        check_pair_labels(pairs, data.classes)
    except DataError as exc:
        raise ClassifierConfigError(str(exc)) from None
    if config.loss == "supcon":
        unlabelled = next((line for label, line in zip(pairs.labels or (), pairs.lines) if not label),
                          None if pairs.labels else pairs.lines[0])
        if unlabelled is not None:
            raise ClassifierConfigError(f"{pairs.path}:{unlabelled}: --loss supcon needs a label column naming "
                                        "each row's class (the anchor's and the positive's)")
    elif not pairs.is_triples and config.loss not in SIMILARITY_PAIR_OBJECTIVES:
        raise ClassifierConfigError(f"{pairs.path}: text_a, text_b, same rows need --loss contrastive, cosine or "
                                    f"supcon; --loss {config.loss} takes anchor, positive, negative rows")


def train_classifier(config: ClassifierConfig) -> art.Artifact:
    """Both stages; returns the artifact (serves `embed` and `classify`)."""
    config = config.validate()
    output = Path(config.output).expanduser().resolve()
    config = dataclasses.replace(config, output=str(output), name=config.name or output.name)
    if art.is_artifact(output):
        raise ClassifierConfigError(f"{output}: already holds an artifact; choose another --output")
    base, _ = art.resolve_model_source(config.model or None)
    data = load_examples(config)
    user_pairs = read_contrast_pairs(config.pairs_file) if config.pairs_file else None  # fail before training
    if user_pairs is not None:
        check_user_pairs(config, data, user_pairs)
    started = time.perf_counter()
    stage1: dict[str, Any] | None = None
    if config.frozen_body:
        body = copy_body(config, base)
    else:
        body, stage1 = train_body(config, data, base, user_pairs)
    body_seconds = time.perf_counter() - started
    head_record = train_head(config, data, body)  # the labelled texts only: never the user pairs
    return art.update_metadata(body.path, {"classifier": {
        "config": {**dataclasses.asdict(config), "model": str(base)},
        "labels": list(data.classes),
        "body_seconds": round(body_seconds, 1),
        "stage1": stage1,
        "head": head_record,
    }})


# --- the `embedline train-classifier` verb ----------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """One option per ClassifierConfig field (`--max-seq-length` for max_seq_length), then --threads."""
    groups = {None: parser}
    types = typing.get_type_hints(ClassifierConfig)
    for field in dataclasses.fields(ClassifierConfig):
        group = field.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        _add_option(groups[group], field, types[field.name])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _add_option(parser: Any, field: dataclasses.Field, kind: type) -> None:
    """The option of one field on a parser or argument group: a flag for a bool (`--no-x` when it defaults
    to True), else a typed value (required when the field has no default)."""
    name = field.name.replace("_", "-")
    flag = f"--{name}"
    help_text = field.metadata["help"]
    if field.default is dataclasses.MISSING:
        parser.add_argument(flag, dest=field.name, type=kind, required=True, help=help_text)
    elif kind is bool and field.default:
        parser.add_argument(f"--no-{name}", dest=field.name, action="store_false", help=f"turn off: {help_text}")
    elif kind is bool:
        parser.add_argument(flag, dest=field.name, action="store_true", help=help_text)
    else:
        shown = f" (default: {field.default})" if field.default != "" else ""
        parser.add_argument(flag, dest=field.name, type=kind, default=field.default,
                            choices=field.metadata.get("choices"), help=help_text + shown)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ClassifierConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClassifierConfig)})
    artifact = train_classifier(config)
    record = artifact.metadata["classifier"]
    print(f"artifact: {artifact.path}")
    print(f"labels: {', '.join(record['labels'])}")
    print(f"head training accuracy: {record['head']['train_accuracy']:.3f}")
    print(f"serve it: embedline serve --artifact {artifact.path}")
    return 0
