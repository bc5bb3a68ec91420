"""`embedline publish`: roll a running server to a new version of an artifact, without dropping requests.

The server must run with `embedline serve --repository DIR --watch`. Publishing writes the new artifact as
the next numbered version of a served `embed` model in that repository:

    DIR/embed/1/        the version serving now
    DIR/embed/2/        the new one: staged beside the repository, then renamed in whole, so the watcher
                        never sees half of it

The launcher's watcher notices the new version within a second and asks Triton to load the model
(explicit model control). Triton loads version 2 beside version 1, sends new requests to it once it is
ready and unloads version 1 after its in-flight requests finish (the default version policy serves the
latest version only). The new artifact must keep the served embedding size; a classifier head is not
republished (restart the server for a new head).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embedline import artifact as art
from embedline import wire
from embedline.serving.repository import embed_config, embed_parameters, settings_from_config, write_embed_version
from embedline.serving.triton import ServingError
from embedline.variants import SERVABLE_VARIANTS, available_device, choose_variant, variant_files

log = logging.getLogger(__name__)



def versions(model_dir: Path) -> list[int]:
    """The numbered version directories of a model, ascending."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def embed_model_dir(repository: Path, name: str | None) -> Path:
    """The served `embed` model of the artifact called `name` (default: the server's default artifact)."""
    default = repository / wire.EMBED_MODEL
    if not (default / "config.pbtxt").is_file():
        raise ServingError(f"{repository} is not an embedline model repository (no {wire.EMBED_MODEL}/config.pbtxt)")
    if name is None:
        return default
    parameters = _read_config(default / "config.pbtxt").parameters
    catalog = wire.decode(wire.EMBED_PARAMETERS["served_models"], parameters["served_models"].string_value)
    if name not in catalog:
        raise ServingError(f"no served model named {name!r}; the server serves {', '.join(catalog)}")
    return repository / catalog[name]["embed"]


def publish(artifact: art.Artifact, repository: str | Path, model: str | None = None,
            variant: str | None = None) -> tuple[str, int]:
    """Write `artifact` as the next version of a served embed model; -> (Triton model name, version)."""
    repository = Path(repository).resolve()
    model_dir = embed_model_dir(repository, model)
    config_path = model_dir / "config.pbtxt"
    config = _read_config(config_path)
    if config.backend != "python":
        raise ServingError(f"{model_dir.name} is not a python-layout model: publish serves the embedded server")
    served_dim = wire.decode(wire.EMBED_PARAMETERS["dim"], config.parameters["dim"].string_value)
    if artifact.dim != served_dim:
        raise ServingError(f"{artifact.path} makes {artifact.dim}-d embeddings, the served model {served_dim}-d; "
                           "serve it as a new model instead")
    device = available_device()
    variant = variant or choose_variant(artifact, device)
    version = (versions(model_dir) or [0])[-1] + 1
    staging = repository.parent / f".{repository.name}-staging-{model_dir.name}-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    write_embed_version(artifact, staging, variant_files(artifact, variant))
    # The config describes the new version as `build-repo` would write it (Triton rereads it on load): the
    # settings the server was started with, its catalog and its search store stay, what follows the artifact
    # and variant changes.
    settings = replace(settings_from_config(config), variant=variant)
    catalog = wire.decode(wire.EMBED_PARAMETERS["served_models"], config.parameters["served_models"].string_value)
    tmp_config = config_path.with_name(".config.pbtxt.tmp")
    store_uri = config.parameters["store_uri"].string_value if "store_uri" in config.parameters else ""
    params = embed_parameters(artifact, settings, catalog, store_uri)
    tmp_config.write_text(embed_config(artifact, model_dir.name, settings, params), encoding="utf-8")
    tmp_config.replace(config_path)
    staging.rename(model_dir / str(version))  # the watcher sees the version whole or not at all
    log.info("published %s as version %d of model %s", artifact.path, version, model_dir.name)
    return model_dir.name, version


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", required=True, help="the new artifact (exported first if needed)")
    parser.add_argument("--repository", required=True,
                        help="the model repository of a server started with `embedline serve --repository DIR --watch`")
    parser.add_argument("--model", default=None, help="served model to update (default: the server's default)")
    parser.add_argument("--variant", choices=SERVABLE_VARIANTS, default=None,
                        help="variant to serve (default: the artifact's best on this machine)")


def run(args: argparse.Namespace) -> int:
    from embedline.export.ensure import ensure_exported  # the export pipeline (torch) only when one is due

    model, version = publish(ensure_exported(args.artifact), args.repository, args.model, args.variant)
    print(f"published {args.artifact} as version {version} of model {model}; "
          "a server started with --watch loads it within a second")
    return 0
