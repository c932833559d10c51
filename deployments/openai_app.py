"""Serve application builder for `serve run`, `serve deploy` and KubeRay's RayService.

    serve run deployments.openai_app:app_builder config=configs/tiny.yaml checkpoint=<dir or best.json>

or, in a Serve config file / RayService `serveConfigV2`:

    import_path: deployments.openai_app:app_builder
    args: {config: configs/small.yaml, checkpoint: /mnt/shared/raylm_results/<sweep>/best.json,
           set: ["serve.max_num_seqs=128"], version: v3}

The args are validated (unknown keys are errors), the config is loaded exactly like the CLI
does, and the app is the one `raylm serve` runs. API keys are read here, where the app is
built (the RayService pods get `serve.api_key_env` from a Secret), and only their hashes are
passed on to the replicas.
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from raylm.config import ConfigError, load_config
from raylm.serve.app import build_app
from raylm.servable import checkpoint_version, resolve_checkpoint


class AppArgs(BaseModel):
    """The builder's args (`key=value` on the `serve run` command line, `args:` in a config file)."""

    model_config = ConfigDict(extra="forbid")

    config: Optional[str] = Field(None, description="raylm YAML config; None uses the defaults.")
    checkpoint: Optional[str] = Field(None, description="HF checkpoint dir or best.json; default serve.checkpoint.")
    set: Union[list[str], str] = Field(default_factory=list, description="Dotted overrides, like --set.")
    version: Optional[str] = Field(None, description="The model version every response names (header "
                                   "x-raylm-model-version); default: `ckpt-` and a hash of the resolved checkpoint.")

    def overrides(self) -> list[str]:
        return [self.set] if isinstance(self.set, str) else list(self.set)


def app_builder(args: dict) -> serve.Application:
    """Build the OpenAI-compatible app from `{"config", "checkpoint", "set"}`."""
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"deployments.openai_app:app_builder args ({', '.join(AppArgs.model_fields)}): "
                          f"{problems}") from None
    cfg = load_config(parsed.config, parsed.overrides())
    checkpoint = resolve_checkpoint(parsed.checkpoint or cfg.serve.checkpoint)
    return build_app(cfg, checkpoint, model_version=parsed.version or checkpoint_version(checkpoint))
