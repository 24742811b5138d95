"""The house plan: the schema imports nothing of glam, no import cycles, every field classified."""

import ast
import subprocess
import sys
from pathlib import Path

import glam
from glam.identity import ROLES, Role, all_fields, checkpoint_identity, role, select
from glam.resolve import load

PACKAGE = Path(glam.__file__).parent


def test_the_schema_imports_no_other_glam_module():
    code = "import sys, glam.config; print(sorted(m for m in sys.modules if m.startswith('glam')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['glam', 'glam.config']"


ROOTS = ("glam", "analysis", "hydra_plugins")  # the packages of the checkout


def _imports() -> dict[str, set[str]]:
    """module of glam, analysis or hydra_plugins -> those modules it imports anywhere
    (functions included)."""
    graph = {}
    for path in (p for root in ROOTS for p in (PACKAGE.parent / root).rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_glam():
    graph = _imports()
    # a package's __init__ re-exporting its submodules is not a cycle of the submodules
    graph = {m: {d for d in deps if not m.startswith(f"{d}.")} for m, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def layer(module: str) -> int:
    """0 the library; 1 planning and analysis (glam.study, analysis); 2 the application: the
    command-line entry points and Hydra's callbacks and plugins (glam.cli, hydra_plugins)."""
    if module.startswith(("glam.cli", "hydra_plugins")):
        return 2
    return 1 if module.startswith(("glam.study", "analysis")) else 0


def test_no_module_imports_one_from_a_higher_layer():
    upward = sorted(f"{m} -> {d}" for m, deps in _imports().items() for d in deps
                    if layer(d) > layer(m))
    assert not upward, upward


def test_only_the_application_imports_analysis():
    """analysis imports glam; in glam only the application layer imports analysis."""
    inside = sorted(f"{m} -> {d}" for m, deps in _imports().items() for d in deps
                    if m.startswith("glam.") and layer(m) < 2 and d.split(".")[0] == "analysis")
    assert not inside, inside


def test_the_layer_rules_see_a_violation():
    assert layer("glam.model.moe") < layer("glam.study.plan") < layer("glam.cli.train")
    assert layer("analysis.figures") == layer("glam.study.runs") == 1


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_config_field_has_a_role_and_every_role_a_field():
    fields = set(all_fields())
    missing, stale = sorted(fields - set(ROLES)), sorted(set(ROLES) - fields)
    assert not missing, f"classify these in glam.identity._TABLE: {missing}"
    assert not stale, f"glam.identity._TABLE names fields that do not exist: {stale}"
    assert all(isinstance(role(f), Role) for f in fields)


def test_an_unclassified_field_is_refused():
    import pytest

    with pytest.raises(KeyError, match="mesh.new_knob"):
        role("mesh.new_knob")


def test_identity_holds_the_resolved_dispatch_and_not_the_layout():
    cfg = load(["model=tiny_moe", "mesh=cpu8"], backend="cpu")
    ident = checkpoint_identity(cfg, "fp")
    assert ident["model"]["router"]["dispatch"] == "gather"
    assert ident["derived"] == {"drops_tokens": True}
    assert "mesh" not in ident and "logger" not in ident and "eval" not in ident
    layout = select(cfg, {Role.LAYOUT})
    assert set(layout) == {"mesh", "distributed", "eval", "derived", "faults"}
    assert layout["eval"] == {"batch_size": cfg.eval.batch_size}


HEAVY = ("jax", "flax", "optax", "mlflow", "optuna", "pandas", "matplotlib", "dask")


def test_every_command_answers_help_without_importing_jax():
    """`<command> --help` for every console script of pyproject.toml prints its usage without
    importing JAX or the other heavy libraries (they cost seconds of CPU before a word)."""
    import tomllib

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    code = ("import importlib, sys\nmodule, name = sys.argv[1].split(':')\n"
            "sys.argv = [sys.argv[2], '--help']\n"
            "try:\n    getattr(importlib.import_module(module), name)()\n"
            "except SystemExit:\n    pass\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    said = {command: subprocess.run([sys.executable, "-c", code, target, command],
                                    capture_output=True, text=True, timeout=300)
            for command, target in scripts.items()}
    for command, out in said.items():
        assert "usage" in out.stdout.lower() or "powered by hydra" in out.stdout.lower(), \
            (command, out.stdout[-1000:], out.stderr[-2000:])
    heavy = {c: out.stdout.strip().splitlines()[-1] for c, out in said.items()}
    assert all(line == "HEAVY []" for line in heavy.values()), heavy


def test_resolving_does_not_import_the_preparation():
    """The vocabulary a config implies comes from `glam.data.vocab`: `glam.resolve` does not
    import `glam-data prepare`'s driver (nor the Dask engine it starts)."""
    code = ("import sys, glam.resolve\n"
            "print(sorted(m for m in sys.modules if m.startswith(('glam.data.prepare', "
            "'glam.data.engine', 'dask'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_data_module_is_over_400_lines():
    long = {p.name: n for p in (PACKAGE / "data").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


TRAINER = PACKAGE / "trainer.py"


def _trainer_class() -> ast.ClassDef:
    return next(n for n in ast.parse(TRAINER.read_text()).body
                if isinstance(n, ast.ClassDef) and n.name == "Trainer")


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_the_trainer_and_its_loop_read_in_one_screen():
    """The periodic actions are hooks (`glam.hooks`), recovery is `glam.recovery`: the class
    stays under 200 lines and its loop under 30."""
    cls = _trainer_class()
    loop = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "_loop")
    assert _lines(cls) < 200 and _lines(loop) < 30, (_lines(cls), _lines(loop))


def _private_uses(source: str, private: set[str]) -> list[str]:
    """`x._name` for every `_name` in `private` that `source` reads (a call or a reference)."""
    return [f"line {n.lineno}: .{n.attr}" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute) and n.attr in private]


def test_no_module_uses_a_private_trainer_method():
    """Other modules drive the trainer through its public `step`, `evaluate`, `save`, `run`."""
    private = {f.name for f in _trainer_class().body if isinstance(f, ast.FunctionDef)
               and f.name.startswith("_") and not f.name.endswith("__")}
    assert _private_uses("trainer._loop(logger)\nf(t._finish)", private) == [
        "line 1: ._loop", "line 2: ._finish"]  # the scan sees a use
    found = {str(p.relative_to(PACKAGE.parent)): uses for p in PACKAGE.rglob("*.py")
             if p != TRAINER and (uses := _private_uses(p.read_text(), private))}
    assert not found, found


def test_the_trainer_never_asks_which_corpus():
    """World and text serve the trainer through one interface (`glam.data.corpus.Corpus`)."""
    source = TRAINER.read_text()
    assert "isinstance" not in source and "data.kind" not in source
