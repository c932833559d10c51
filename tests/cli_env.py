"""The environment of a command a test runs in a subprocess (`raylm ...`, `ray ...`): a user's
second shell, not the test process. The test process carries what Ray put into os.environ when it
started the suite's cluster (RAY_AUTH_MODE=token, RAY_API_SERVER_ADDRESS, the Serve ingress
settings), which made a `raylm promote` subprocess join where a user's fresh shell could not
(issue 34). So a subprocess gets PATH (the venv first, as an activated venv puts it), HOME, what
the README tells users to set (passed by each test: RAY_ADDRESS, RAY_AUTH_TOKEN_PATH, AWS_*,
RAYLM_API_KEYS), and only these settings of the suite's:
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Pure speed knobs (tests/conftest.py): how often Ray Train polls its workers and Ray exports
# metrics. They change how long a command takes, never whether it works.
SPEED_KNOBS = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_metrics_report_interval_ms")
# What a user on a machine without network sets (Hugging Face's own variables): CI has none.
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Object storage credentials and endpoint, as README "Storage" tells users to export them (set by
# the s3_server fixture while an s3 test runs).
OBJECT_STORE = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def clean_env(**extra: str) -> dict[str, str]:
    """PATH, HOME, the settings above where the suite has them, and `extra` (what the test's user
    sets). DS_ACCELERATOR and TOKENIZERS_PARALLELISM are left out: raylm sets them itself."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HOME": os.environ.get("HOME") or str(Path.home())}
    env.update({k: os.environ[k] for k in (*SPEED_KNOBS, *OFFLINE, *OBJECT_STORE) if k in os.environ})
    env.update(extra)
    return env
