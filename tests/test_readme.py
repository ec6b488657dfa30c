"""The README's "Merge your own models" section runs as written: its Python blocks in order,
its shell commands with this environment's ``symmerge``, in a fresh folder, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Merge your own models"


def _blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def test_the_section_has_python_and_shell_examples() -> None:
    kinds = [k for k, _ in _blocks()]
    assert "python" in kinds and "bash" in kinds
    shell = "".join(code for k, code in _blocks() if k == "bash")
    for ref in ("hf:", "timm:", "torchvision:", "module:"):
        assert ref in shell, f"no {ref} example"


def test_merge_your_own_models_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # fmt: skip
    for kind, code in _blocks():
        if kind == "python":
            exec(compile(code, str(README), "exec"), {"__name__": "readme"})
        else:
            run = subprocess.run(["bash", "-e", "-c", code], env=env, cwd=tmp_path,
                                 capture_output=True, text=True)  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "gpt2-merged" / "config.json").is_file()
