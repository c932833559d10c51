"""The README's first command, `raylm pipeline`, run as a user runs it (a subprocess with its own
local Ray), shrunk by `--set` to one short trial; then `raylm status` over what it left."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAYLM = str(Path(sys.executable).parent / "raylm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pipeline_end_to_end_then_status(tmp_path, cache_dir):
    key_file = tmp_path / "keys"
    key_file.write_text("sk-raylm-pipeline-test\n")
    settings = [f"train.storage_path={tmp_path / 'results'}", f"data.cache_dir={cache_dir}", "tune.num_samples=1",
                "train.max_steps=10", "train.eval_every_steps=5", "train.checkpoint_every_steps=5",
                f"serve.port={free_port()}", f"serve.api_key_file={key_file}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run([RAYLM, "pipeline", *(a for s in settings for a in ("--set", s))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-4000:]}\n{proc.stderr[-4000:]}"
    for n in range(1, 5):
        assert f"=== [{n}/4]" in out  # every stage announced, in order
    assert out.index("=== [1/4]") < out.index("=== [2/4]") < out.index("=== [3/4]") < out.index("=== [4/4]")
    # a short story, not the libraries' logs: no worker output, no warnings, under 60 lines
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert not [ln for ln in lines if re.search(r"[Ww]arning|\(pid=|Trial status|INFO|DEBUG|Traceback", ln)], out
    assert re.search(r"^tune: tiny-sweep: 1/1 trials", out, re.M), out
    # a real completion came back through the endpoint, with usage, for a prompt taken from the corpus
    from raylm.data import embedded_documents

    first_words = " ".join(embedded_documents()[0].split("\n")[0].split()[:3])
    reply = re.search(r"prompt: '(.+)' -> '(.*)'  \(usage (\{.*\})\)", out)
    assert reply, out[-3000:]
    assert reply.group(1) == first_words and "'completion_tokens': " in reply.group(3)
    # the user is told where the endpoint and key are, never the key itself
    assert re.search(r"serving raylm at http://127\.0\.0\.1:\d+/v1", out)
    assert str(key_file) in out and "sk-raylm-pipeline-test" not in out + proc.stderr
    assert "curl " in out and "openai.OpenAI(" in out
    best = json.loads((tmp_path / "results" / "tiny-sweep" / "best.json").read_text())
    assert Path(best["checkpoint"], "model.safetensors").is_file()

    status = subprocess.run([RAYLM, "status", "--set", f"train.storage_path={tmp_path / 'results'}"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert re.search(rf"tiny-sweep: 1 trial\(s\), best {best['trial_id']} val_loss=", status.stdout), status.stdout
    assert "runs (0):" in status.stdout and "\nserving:\n  " in status.stdout
