"""The package's import graph, read from the source (top-level and function-level imports alike): no module
imports itself through others, and the pure primal-dual loop knows nothing of Ray, MLflow or progress bars."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cdd_ray"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (``from a import b`` names ``a.b`` when that is a
    module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = {d for d in imports(path) if d in modules and d != name and d != "cdd_ray"}
        # "from cdd_ray.x import y": keep cdd_ray.x.y when it is a module, else cdd_ray.x
        graph[name] = {d for d in deps if not any(o.startswith(d + ".") and o in deps for o in deps)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = package_graph()
    assert {"cdd_ray.runner", "cdd_ray.cluster.worker", "cdd_ray.core.loop"} <= set(graph)
    assert "cdd_ray.core.loop" in graph["cdd_ray.cluster.worker"]  # the graph sees imports
    assert cycles(graph) == []


def test_the_pure_loop_knows_nothing_of_ray_mlflow_or_progress_bars():
    for path in (PACKAGE / "core").glob("*.py"):
        outside = {d.split(".")[0] for d in imports(path)} & {"ray", "mlflow", "tqdm"}
        assert not outside, (path.name, outside)


def test_a_jobs_checks_import_none_of_the_heavy_stack():
    """What a job reads before it refuses bad input (its flags, the front's request, preflight's paths) imports
    neither torch, diffusers, MLflow nor Ray Tune: a refusal takes a second or two, not the 10 s of importing them."""
    import subprocess
    import sys

    heavy = ("torch", "diffusers", "mlflow", "ray.tune", "ray.train")
    code = ("import sys, cdd_ray.cli, cdd_ray.front, cdd_ray.preflight, cdd_ray.evaluation.fairness; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
