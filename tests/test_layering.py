"""The package follows the data flow: one sub-package per stage, imports in one direction.

Stages in order (DESIGN.md's layout): a module may import its own stage, earlier stages and the
shared helpers; kernels/ is the ground floor; cli/ may import anything. Parsed with ast, so a lazy
import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ggtrain.<stage> -> rank; a module may import only ranks <= its own (samples: data files only) (errors, which imports nothing, is on the ground floor with kernels; the other shared helpers are rank 1).
STAGES = {"kernels": 0, "errors": 0, "atomic": 1, "threads": 1, "rss": 1, "gguf": 2, "text": 3, "dataset": 4,
          "model": 5, "adapters": 6, "train": 7, "generate": 8, "cli": 9, "samples": 0}
SHARED = {"errors", "atomic", "threads", "rss"}


def stage_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] in ("kernels", "cli"):
        return rel.parts[0]
    assert rel.parts[0] == "ggtrain", rel
    return rel.parts[1].removesuffix(".py") if len(rel.parts) > 1 else "ggtrain"


def imported_stages(path: Path) -> list[tuple[int, str]]:
    """(line, stage) of every ggtrain import in a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ggtrain":
                names = [f"ggtrain.{a.name}" for a in node.names]
            elif node.module.startswith("ggtrain."):
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ggtrain.")]
        for n in names:
            stage = n.split(".")[1]
            if stage != "__version__":
                out.append((node.lineno, stage))
    return out


def modules() -> list[Path]:
    found = sorted((REPO / "ggtrain").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py"))
    return [p for p in found if "build" not in p.parts]


def test_one_stage_a_package_one_level_deep() -> None:
    top = {p.name for p in (REPO / "ggtrain").iterdir() if not p.name.startswith((".", "__pycache__"))}
    packages = {n for n in top if (REPO / "ggtrain" / n).is_dir()}
    modules_ = {n.removesuffix(".py") for n in top if n.endswith(".py")}
    assert modules_ <= SHARED | {"__init__"}, f"flat modules outside a stage: {modules_ - SHARED}"
    assert packages <= set(STAGES), packages
    for pkg in packages:  # flat inside
        assert not [d for d in (REPO / "ggtrain" / pkg).iterdir() if d.is_dir() and d.name != "__pycache__"]


def test_imports_go_one_way() -> None:
    back_edges = []
    for path in modules():
        own = stage_of(path)
        if own == "ggtrain":
            continue
        for line, stage in imported_stages(path):
            if stage not in STAGES:
                back_edges.append(f"{path.relative_to(REPO)}:{line} imports unknown ggtrain.{stage}")
            elif STAGES[stage] > STAGES[own] :
                back_edges.append(f"{path.relative_to(REPO)}:{line}: {own} imports the later stage {stage}")
    assert not back_edges, "\n".join(back_edges)


def test_the_checker_sees_a_back_edge(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from ggtrain.train.trainer import Trainer\n")
    assert imported_stages(bad) == [(2, "train")]
