"""Model control (the repository extension's load and unload), closed by default, as Triton's.

``--model-control-mode none`` (the default) refuses load and unload: the model keeps serving and
only the operator's SIGHUP reloads it. ``explicit`` lets *admin* callers (see
:mod:`.admission`) unload the model and load a version from inside the model repository: by
default the folder that holds ``--model-dir``, or ``--model-repository``. A ``model_dir``
outside it, given as an absolute path, through ``..`` or through a symlink, is refused, and no
message names a host path beyond the repository. Both APIs decode their request into plain
values and call :class:`ModelControl`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from .core import ServingCore
from .errors import Code, InferenceError, InvalidInput, ModelLoadFailed, ModelNotFound
from .settings import Settings

__all__ = ["ControlDisabled", "ModelControl", "repository_root"]

logger = logging.getLogger(__name__)


class ControlDisabled(InferenceError):
    code = Code.FAILED_PRECONDITION


def repository_root(settings: Settings) -> str:
    """The one folder loads may read, resolved (symlinks followed)."""
    root = settings.model_repository or str(Path(settings.model_dir).absolute().parent)
    return os.path.realpath(root)


class ModelControl:
    def __init__(self, core: ServingCore, settings: Settings) -> None:
        self.core = core
        self.settings = settings
        self.root = repository_root(settings)

    def _check(self, model_name: str, verb: str) -> None:
        if model_name != self.core.model_name:
            raise ModelNotFound(f"unknown model {model_name!r}; this server serves {self.core.model_name!r}")
        if self.settings.model_control_mode != "explicit":
            raise ControlDisabled(
                f"model {verb} is disabled: the server runs with --model-control-mode none; start it "
                "with --model-control-mode explicit (and --admin-token) to allow it"
            )

    def resolve(self, model_dir: str) -> str:
        """``model_dir`` (relative to the repository, or absolute inside it) as a real path."""
        if "\0" in model_dir:
            raise InvalidInput("parameter 'model_dir' holds a NUL byte")
        candidate = model_dir if os.path.isabs(model_dir) else os.path.join(self.root, model_dir)
        real = os.path.realpath(candidate)
        if real != self.root and os.path.commonpath([self.root, real]) != self.root:
            raise InvalidInput(
                "parameter 'model_dir' is outside the model repository (--model-repository); name a "
                "folder inside it, relative to the repository"
            )
        if not os.path.isdir(real):
            raise InvalidInput(
                f"parameter 'model_dir': no folder {self._shown(real)!r} in the model repository"
            )
        return real

    def _shown(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _scrub(self, message: str) -> str:
        # Load errors name files by their real paths: show them relative to the repository.
        return message.replace(self.root + os.sep, "").replace(self.root, ".")

    async def load(self, model_name: str, parameters: Mapping[str, object]) -> str:
        """Load ``parameters['model_dir']`` (default: the configured ``--model-dir``) as the
        serving version; returns the version now serving."""
        self._check(model_name, "load")
        for key in parameters:
            if key != "model_dir":
                raise InvalidInput(f"parameter {key!r}: unknown; load takes 'model_dir'")
        model_dir = parameters.get("model_dir", "")
        if not isinstance(model_dir, str):
            raise InvalidInput("parameter 'model_dir' must be a string")
        source = self.resolve(model_dir) if model_dir else ""
        try:
            return await self.core.load(source)
        except ModelLoadFailed as exc:
            raise ModelLoadFailed(self._scrub(exc.message)) from None

    async def unload(self, model_name: str) -> None:
        self._check(model_name, "unload")
        await self.core.unload()
