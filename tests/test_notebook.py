"""notebooks/quickstart.ipynb runs top to bottom, as one fresh Python process, and makes what it says.

The code cells are joined into a script (no Jupyter needed) and run where a user would run them: a
directory of their own, one CPU device, the package already installed (so the install cell must be a
no-op).

The last cell runs the quick recipe; its stages but the last come already finished from the session's
run of the same config (tests/conftest.py's `quick_pipeline`, which tests/test_pipeline.py checks),
so the notebook's run skips them, runs the chat stage itself and writes the table and figure.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from llama2_jax.recipe.steps import STEP_NAMES

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
FIGURES = ("loss.png", "learning_rate.png", "throughput.png")


def code_cells(notebook: dict) -> list[str]:
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def single_device_environment() -> dict[str, str]:
    """The environment without the eight simulated devices tests/conftest.py asks for, and this
    checkout's package the one imported (as installing it with `pip install -e .` makes it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(NOTEBOOK.parent.parent), *filter(None, [env.get("PYTHONPATH")])])
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def test_the_notebook_is_stored_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    assert 'REPO_URL = ""' in code_cells(notebook)[0]


def test_every_cell_runs_in_order_and_the_run_is_trained_evaluated_plotted_and_the_recipe_runs(tmp_path,
                                                                                               quick_pipeline):
    pipeline = tmp_path / "runs" / "pipeline_quick"
    shutil.copytree(quick_pipeline, pipeline, symlinks=True,
                    ignore=lambda directory, names: {"chat", "report.md", "pipeline.png"} & set(names)
                    if directory == str(quick_pipeline) else set())
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(code_cells(json.loads(NOTEBOOK.read_text()))))
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=single_device_environment(),
                               capture_output=True, text=True, timeout=1500, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    out = completed.stdout
    assert not (tmp_path / "llama2_jax_repo").exists()  # installed already: nothing cloned
    workdir = tmp_path / "runs" / "quickstart"
    assert (workdir / "checkpoints" / "40").is_dir() and (workdir / "metrics.jsonl").is_file()
    assert "\nROMEO:" in out and "[INST] <<SYS>>" in out and "assistant:" in out
    assert "perplexity: {'perplexity':" in out and "next line: {'accuracy':" in out
    for name in FIGURES:
        assert (workdir / name).stat().st_size > 0
        assert f"runs/quickstart/{name}" in out
    assert out.count("finished before, skipped") == len(STEP_NAMES) - 1 and "=== chat:" in out  # chat ran here
    assert (pipeline / "pipeline.png").stat().st_size > 0 and (pipeline / "chat" / "step.json").is_file()
    assert "| ppo |" in out and "| all |" in out  # the pipeline's table, printed
