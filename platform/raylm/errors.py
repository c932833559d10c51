"""raylm's one error hierarchy. Every error a user can fix is an `InputError`: the CLI prints it
and exits 2, and a Serve request never sees one. Each names what caused it (a config field, a
file, a URI, a parameter) in its message; `ConfigError` also carries the field paths as data, so
callers never parse them back out of the text."""

from __future__ import annotations

from typing import Iterable


class InputError(ValueError):
    """Bad user input (config, corpus, checkpoint, storage, sweep file): exit code 2."""


class ConfigError(InputError):
    """A config that cannot run. `fields` holds the dotted path of every offending field."""

    def __init__(self, message: str, fields: Iterable[str] = ()):
        super().__init__(message)
        self.fields: tuple[str, ...] = tuple(fields)


class DataError(InputError):
    """A corpus, dataset or tokenizer that cannot be read or used; names the file or source."""


class ModelError(InputError):
    """A model that cannot be built or loaded; names model.name."""


class StorageError(InputError):
    """A storage URI that cannot be read or written (missing, unreachable, no credentials); names it."""


class CheckpointError(InputError):
    """A checkpoint (or best.json) that cannot be resumed from or served; names its path and what is wrong."""


class ApiKeyError(InputError):
    """An API key source that cannot be read; names the file or env var."""


class ServeDeployError(InputError):
    """A Serve application that could not be deployed (bad checkpoint contents, no resources); names it."""
