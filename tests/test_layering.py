"""The package's layers: no stage imports another stage or the command line, sampling and scoring
import no stage, and parsing a config is apart from the recipe that documents its keys."""

import ast
import pathlib

from llama2_jax import stages

PACKAGE = pathlib.Path(stages.__file__).parent.parent


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every llama2_jax module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama2_jax"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("llama2_jax"))
    return names


def test_no_stage_imports_another_stage_or_the_command_line():
    stage_modules = {stage.module for stage in stages.STAGES.values()}
    for stage in stage_modules:
        path = PACKAGE.parent / (stage.replace(".", "/") + ".py")
        imported = imported_modules(path)
        others = sorted(imported & (stage_modules - {stage}))
        assert not others, f"{stage} imports the stage(s) {others}"
        upward = sorted(name for name in imported
                        if (name.split(".") + [""])[1] in ("cli", "commands", "recipe", "config_cli"))
        assert not upward, f"{stage} imports {upward}"


def test_sampling_scoring_and_evaluation_import_no_stage():
    for package in ("rollout", "eval", "train", "model", "data", "checkpoint"):
        for path in (PACKAGE / package).glob("*.py"):
            stage_imports = sorted(name for name in imported_modules(path) if name.startswith("llama2_jax.stages"))
            assert not stage_imports, f"{path.relative_to(PACKAGE.parent)} imports {stage_imports}"


def test_config_parsing_imports_neither_the_stages_nor_the_recipe():
    # The pipeline's steps parse configs; what the keys mean (config_help.py) reads the steps in turn.
    imported = imported_modules(PACKAGE / "config_cli.py")
    assert not [name for name in imported if name.startswith(("llama2_jax.stages", "llama2_jax.recipe"))], imported
