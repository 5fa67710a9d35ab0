"""The allowed import directions of docs/ARCHITECTURE.md, checked on the source (no imports run).

* model code (tokenizer/model, dynamics/model, policy/heads, behavior/model) imports only config,
  nn/ and other model modules;
* the loading layer (runtime/loading) and the stage contract (runtime/stage) import no training,
  evaluation, train-loop or pipeline module: they sit below training and evaluation;
* runtime/ and data/ import no stage package (tokenizer, dynamics, policy), except loading, which
  assembles the models, and the collection-policy registry, which lists the PPO policy;
* nothing but cli imports pipelines/ or play/ (`dreamer4 play`); play/ imports no training module,
  no train loop and no pipeline: it plays trained models through runtime/loading;
* no import cycles between modules; no function-level (lazy) imports of dreamer4 modules; no
  module named utils.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dreamer4"

# Model code: the network modules themselves. They may import config, nn and other model modules.
MODEL_MODULES = {
    "dreamer4.tokenizer.model",
    "dreamer4.dynamics.model",
    "dreamer4.policy.heads",
    "dreamer4.behavior.model",
}
ALLOWED_FOR_MODELS = {"dreamer4.config", "dreamer4.nn"} | MODEL_MODULES


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The dreamer4 module an imported name refers to (a package's __init__ for a package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported dreamer4 module, line, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    # imports under `if TYPE_CHECKING:` or `try:` at top level count as module level
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module + "." + a.name for a in node.names]
        for n in names:
            if n.startswith("dreamer4"):
                target = _resolve(n)
                if target:
                    out.append((target, node.lineno, id(node) in top))
    return out


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_model_code_imports_only_config_nn_and_models():
    bad = [
        (m, t, line)
        for m in MODEL_MODULES
        for t, line, _ in GRAPH[m]
        if not any(t == a or t.startswith(a + ".") for a in ALLOWED_FOR_MODELS)
    ]
    assert not bad, f"model modules import beyond config / nn / models: {bad}"


def test_loading_sits_below_training_and_evaluation():
    """runtime/loading and the stage contract import no training, evaluation or pipeline module."""
    for m in ("dreamer4.runtime.loading", "dreamer4.runtime.stage"):
        bad = [
            t
            for t, _, _ in GRAPH[m]
            if t.endswith((".train", ".evaluate"))
            or t.startswith("dreamer4.pipelines")
            or t in ("dreamer4.runtime.train_loop", "dreamer4.runtime.host_loop", "dreamer4.cli")
        ]
        assert not bad, (m, bad)


def test_runtime_and_data_do_not_import_stages():
    """runtime/ and data/ (the lower layers) import no stage's training or evaluation module."""
    stage_pkgs = ("dreamer4.tokenizer", "dreamer4.dynamics", "dreamer4.policy")
    for m in MODULES:
        if not m.startswith(("dreamer4.runtime", "dreamer4.data")):
            continue
        for t, line, _ in GRAPH[m]:
            if m in ("dreamer4.runtime.loading", "dreamer4.data.policies"):
                continue  # loading assembles models; the policy registry lists the PPO policy
            assert not t.startswith(stage_pkgs), f"{m}:{line} imports {t}"


def test_nothing_but_cli_imports_pipelines():
    for m, deps in GRAPH.items():
        if m == "dreamer4.cli" or m.startswith("dreamer4.pipelines"):
            continue
        bad = [t for t, _, _ in deps if t.startswith("dreamer4.pipelines")]
        assert not bad, f"{m} imports {bad}"
    assert not [t for t, _, _ in GRAPH["dreamer4.pipelines.run"] if t == "dreamer4.cli"]


def test_play_is_a_leaf_beside_the_pipelines():
    for m, deps in GRAPH.items():
        if m == "dreamer4.cli" or m.startswith("dreamer4.play"):
            continue
        assert not [t for t, _, _ in deps if t.startswith("dreamer4.play")], f"{m} imports play/"
    for m in (m for m in GRAPH if m.startswith("dreamer4.play")):
        bad = [
            t
            for t, _, _ in GRAPH[m]
            if t.endswith(".train")
            or t.startswith("dreamer4.pipelines")
            or t in ("dreamer4.runtime.train_loop", "dreamer4.runtime.host_loop", "dreamer4.cli")
        ]
        assert not bad, (m, bad)


def test_no_lazy_imports_of_dreamer4_modules():
    lazy = [(m, t, line) for m, deps in GRAPH.items() for t, line, top in deps if not top]
    assert not lazy, f"function-level imports of dreamer4 modules: {lazy}"


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in deps if t != m}) for m, deps in GRAPH.items()}
    # a module imports its package's __init__ implicitly; those are trivial here (docstrings only or nn's
    # re-exports), so only explicit edges are checked
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_no_module_named_utils():
    assert not [m for m in MODULES if m.rpartition(".")[2] in ("utils", "util")]


def test_modules_sharing_the_trained_models_run_in_one_xdist_group():
    """Every test module that uses the session's trained tokenizer / world model / agent is in
    conftest's "world" group, so `pytest -n 2` trains that chain on one worker only (a module
    left out would train it again on the other: minutes of CI)."""
    from conftest import WORLD_MODULES, group_of

    chain = ("trained_tokenizer", "world_run", "trained_agent")
    users = set()
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(a.arg in chain for a in node.args.args):
                users.add(path.stem)
    assert users and users <= set(WORLD_MODULES), sorted(users - set(WORLD_MODULES))
    assert group_of("tests/test_play.py::test_x[1]") == "world" and group_of("tests/test_nn.py::t") == "test_nn"
