"""Model options: one file per model, ``conf/models/NAME.yaml``, offered to Hydra as both
``teacher=NAME`` and ``student=NAME``.

The ``teacher`` and ``student`` groups have no folder of their own. A config source
(:class:`ModelOptions`, scheme ``kdcl-model://``) serves every file of ``conf/models/`` as
an option of either group, and a search-path plugin (:class:`ModelSearchPath`, registered
with Hydra on import of :mod:`kdcl.config`) puts that source on the search path just after
``conf/``, where the two folders were. Everything Hydra does with a group therefore works
as with a folder: the defaults list (``teacher: cnn``), ``override /teacher: vgg`` in an
experiment, ``student=vgg_small``, sweeps (``-m student=mlp,cnn``, ``student=glob(*)``),
the options listed by ``--help`` and by the error for an unknown option. A ``teacher/`` or
``student/`` folder of the user's (``--config-dir``, ``hydra.searchpath``) adds options to
its group; like an option of any other group, one named as a kdcl option is not used (kdcl's
config folders come first on Hydra's search path).

Why not Hydra's ConfigStore: Hydra 1.3 merges a config file onto a ConfigStore entry of
the same path (its deprecated "automatic schema matching"), so a user's ``teacher/vgg.yaml``
would be merged onto kdcl's, with a deprecation warning, instead of being a file of its own.
"""

from __future__ import annotations

import builtins
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from kdcl.config.options import MODEL_GROUPS, option_folder

SCHEME = "kdcl-model"
PROVIDER = "kdcl"


class ModelOptions(ConfigSource):
    """A folder of model files, seen as the groups ``teacher`` and ``student``:
    ``teacher/vgg`` and ``student/vgg`` are both the folder's ``vgg.yaml``."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _file(self, config_path: str) -> Path | None:
        group, _, name = config_path.strip("/").partition("/")
        if group not in MODEL_GROUPS or not name or "/" in name:
            return None
        return Path(self.path) / self._normalize_file_name(name)

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._file(config_path)
        if path is None or not path.is_file():
            raise ConfigLoadError(f"Config not found : {config_path} (model options are in {self.path})")
        text = path.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(text),
            path=self.full_path(),
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        return self.available() and config_path.strip("/") in ("", *MODEL_GROUPS)

    def is_config(self, config_path: str) -> bool:
        path = self._file(config_path)
        return path is not None and path.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> builtins.list[str]:
        group = config_path.strip("/")
        if not self.is_group(group):
            return []
        if group == "":
            return sorted(MODEL_GROUPS) if results_filter in (None, ObjectType.GROUP) else []
        if results_filter not in (None, ObjectType.CONFIG):
            return []
        return sorted(p.stem for p in Path(self.path).glob("*.yaml"))


class ModelSearchPath(SearchPathPlugin):
    """Puts :class:`ModelOptions` on the search path of every Hydra app of this process."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider=PROVIDER, path=f"{SCHEME}://{option_folder(MODEL_GROUPS[0])}")


def register() -> None:
    """Register the source and the plugin with Hydra (done on import)."""
    Plugins.instance().register(ModelOptions)
    Plugins.instance().register(ModelSearchPath)


register()
