"""Imports point one way (cluster → scheduler_service → hybrid_cache, cluster → worker → hybrid_cache)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# Ray stays in thin modules of `cluster` (actors, executor, runtime); the logic under them is plain Python.
FORBIDDEN = {
    "hybrid_cache": {"scheduler_service", "worker", "cluster", "bench", "ray"},
    "scheduler_service": {"worker", "cluster", "bench", "torch", "transformers", "ray"},
    "worker": {"scheduler_service", "cluster", "bench", "ray"},
    "cluster": {"bench"},
}
# The command line is the outermost shell: `aptserve replay` starts a benchmark.
ALLOWED = {"cluster/cli.py": {"bench"}}
RAY_MODULES = {"cluster/executor_ray.py", "cluster/ray_cluster.py", "cluster/ray_runtime.py", "cluster/serve_app.py"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    wrong = {}
    for f in files:
        name = str(f.relative_to(REPO))
        bad = imported_roots(f) & FORBIDDEN[package] - ALLOWED.get(name, set())
        if bad:
            wrong[name] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_ray_only_in_its_thin_modules() -> None:
    users = {
        str(f.relative_to(REPO))
        for package in ("cluster", "scheduler_service", "worker", "hybrid_cache")
        for f in (REPO / package).rglob("*.py")
        if "ray" in imported_roots(f)
    }
    assert users == RAY_MODULES


def test_simulator_needs_no_model_code() -> None:
    """bench/simulator drives scheduler_service and hybrid_cache only: no worker, torch or Ray."""
    files = sorted((REPO / "bench" / "simulator").rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(REPO)): sorted(imported_roots(f) & {"worker", "torch", "ray", "cluster"}) for f in files}
    assert not {k: v for k, v in wrong.items() if v}, f"the simulator imports model code: {wrong}"


def test_code_and_docs_explain_themselves_without_the_design_brief() -> None:
    """The design brief is not shipped: code and docs cite docs/, never its section numbers."""
    roots = ["cluster", "scheduler_service", "worker", "hybrid_cache", "bench", "tests", "docs", "deploy", "configs"]
    files = [REPO / "README.md", REPO / "Makefile"]
    for root in roots:
        files += [p for p in (REPO / root).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".cpp"}]
    assert len(files) > 50
    citing = [str(p.relative_to(REPO)) for p in files if "DESIGN " + "§" in p.read_text(errors="replace")]
    assert not citing, f"files cite the design brief instead of docs/: {citing}"
