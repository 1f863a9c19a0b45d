"""The checkout shadows no installed package, wherever Python starts.

A Python started in the repository root (``python -m pytest``, ``python -m benchmarks``) has the
root on sys.path, and pytest puts tests/ there too: a regular package or module of the same name as
an installed one would win over it. A top-level ``kernels/`` package once did, and broke
transformers (which imports Hugging Face's ``kernels``)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusedrl

ROOT = Path(__file__).resolve().parents[1]


def _importable_names(folder: Path) -> set[str]:
    """Top-level names that a sys.path entry ``folder`` makes importable as a regular module or
    package (a folder without __init__.py is a namespace portion, which never shadows)."""
    names = set()
    for p in folder.iterdir():
        if p.is_file() and p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").is_file():
            names.add(p.name)
    return names


@pytest.mark.parametrize("folder", ["", "tests"], ids=["root", "tests"])
def test_no_top_level_name_of_an_installed_distribution(folder):
    provided = importlib.metadata.packages_distributions()
    names = _importable_names(ROOT / folder)
    assert names, f"nothing importable found in {ROOT / folder}"
    clashes = {n: provided[n] for n in names if n in provided}
    assert not clashes, f"{ROOT / folder} shadows installed packages: {clashes}"


def test_huggingface_kernels_transformers_trl_and_fusedrl_kernels_import_from_the_root():
    """What broke: transformers -> `from kernels import ...` found the checkout's kernels/."""
    pytest.importorskip("transformers")
    code = (
        "import kernels, transformers.activations, trl.trainer.grpo_trainer, fusedrl, fusedrl.kernels\n"
        "import site\n"
        "from pathlib import Path\n"
        "sites = [Path(p).resolve() for p in site.getsitepackages()]\n"
        "for m in (kernels, fusedrl, fusedrl.kernels):\n"
        "    assert any(Path(m.__file__).resolve().is_relative_to(s) for s in sites), (m.__name__, m.__file__)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_fusedrl_kernels_ship_inside_the_package():
    import fusedrl.kernels as k  # noqa: PLC0415

    assert Path(k.__file__).resolve().parent == Path(fusedrl.__file__).resolve().parent / "kernels"
    for name in ("logprobs", "policy", "scan", "segments"):
        assert (Path(k.__file__).parent / f"{name}.py").is_file(), name
