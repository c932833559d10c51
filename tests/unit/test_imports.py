"""The package's import graph: imports flow one way (config -> data / model -> train (leaves ->
checkpoint, objectives -> step, policy -> metrics -> loop -> driver) -> tune ->
serve / evaluate -> lifecycle / k8s -> pipeline -> cli) and never in a circle. Function-level imports count too: they
hide a dependency from start-up time, not from the design."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "raylm"

# Each module's layer; a module may import its own layer and the ones below, never one above.
LAYERS: dict[str, float] = {
    "raylm.errors": 0,
    "raylm.config": 1,
    "raylm.storage": 2, "raylm.cluster": 2, "raylm.haproxy_rules": 2, "raylm.chat": 2, "raylm.console": 2, "raylm.rewards": 2,
    # what a vLLM engine is, derived from serve: (no Ray): serving replicas, eval and GRPO's rollouts share it
    "raylm.serve.options": 3, "raylm.serve.autoscale": 3,
    "raylm.data": 3, "raylm.model": 3, "raylm.servable": 3,
    # train/, floor by floor: its leaves (collectives, batches, deepspeed, lora, tracking: 4), what
    # knows checkpoints and objectives, then the step and the policy, what reports them, the loop and
    # the driver that starts it
    "raylm.train": 4,
    "raylm.train.checkpoint": 4.1, "raylm.train.export": 4.1, "raylm.train.objectives": 4.1,
    "raylm.train.step": 4.2, "raylm.train.policy": 4.2,
    "raylm.train.metrics": 4.3,
    "raylm.train.loop": 4.4,
    "raylm.train.driver": 4.5,
    "raylm.tune": 5,
    "raylm.serve": 6, "raylm.evaluate": 6,
    "raylm.lifecycle": 7, "raylm.k8s": 7,
    "raylm.status": 8, "raylm.pipeline": 8,
    "raylm.cli": 9, "raylm.__main__": 9, "raylm": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """raylm modules `path` imports anywhere in its body (`from raylm import x` means raylm.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "raylm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raylm":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found - {"raylm"}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def layer(module: str) -> float:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{module}: not placed in a layer; add it to LAYERS in {__file__}"
    return LAYERS[prefix]


def test_every_module_is_placed_and_imports_only_its_layer_or_below():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph().items() for d in sorted(deps) if layer(d) > layer(m)]
    assert upward == [], "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_walker_sees_function_level_imports(tmp_path):
    """The check above must not pass vacuously: a lazy import inside a function is found."""
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from raylm.train.step import train_step\n    from raylm import storage\n")
    assert imports_of(mod, {"raylm.storage", "raylm.train.step"}) == {"raylm.train.step", "raylm.storage"}
