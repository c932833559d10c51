"""What every config section shares: unknown keys refused, and the versions the images are tagged with."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict

RAY_VERSION = "2.60.0"
PYTHON_TAG = "py311"


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)



def expand(path: str) -> str:
    """Expand ~ in local paths; leave URIs (s3://, gs://, hf:) alone."""
    if "://" in path or path.startswith("hf:"):
        return path
    return os.path.abspath(os.path.expanduser(path))
