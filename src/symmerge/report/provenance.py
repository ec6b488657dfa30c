"""Where a report's numbers come from: the code version of what they depend on, the commit,
package versions, hardware, threads and the command.

A cached result is valid only for the code that made it, so cache keys hash the *contents*
of the source files a result depends on (not the arguments alone, nor only a commit, which
misses uncommitted changes).
"""

from __future__ import annotations

import ast
import datetime as dt
import fnmatch
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MERGE_CODE_EXCLUDED",
    "TRAINING_CODE",
    "code_version",
    "command_line",
    "executable_code",
    "cpu_name",
    "git_commit",
    "hardware",
    "merge_code_version",
    "now",
    "package_versions",
    "portable",
    "training_code_version",
]

PACKAGE = Path(__file__).resolve().parent.parent

#: What a trained checkpoint depends on: the recipe, data loading, the models, the file format.
TRAINING_CODE = ("train.py", "data.py", "io.py", "models")

#: Files left out of the code version of the runs, so a change to them does not invalidate a
#: resumable report: drawing, the command line and the drivers of the peers' code (their
#: entries are made anew by every call of their setting, each call's commit recorded) never
#: change a number of ours; the settings' definitions are data, and each run's key holds its
#: own setting's (:meth:`symmerge.report.settings.Setting.definition`), so a setting added to
#: a scale joins a folder that is under way, and a setting whose definition changed must be
#: run again before its folder resumes. Joining folders (``report/join.py``) copies runs as
#: they are. Package-relative ``fnmatch`` patterns: a peer's driver added later
#: (``report/peer_<name>.py``) leaves the runs' code version as it was.
MERGE_CODE_EXCLUDED = (
    "cli.py",
    "report/render.py",
    "report/peer*.py",
    "report/settings.py",
    "report/join.py",
)

#: Environment variables whose values are machine paths: recorded commands name them instead.
PATH_VARIABLES = ("SYMMERGE_DATA", "SYMMERGE_CHECKPOINTS", "HOME")  # most specific first


def _files(parts: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        path = PACKAGE / part
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def code_version(files: Sequence[Path], read: Callable[[Path], bytes] = Path.read_bytes) -> str:
    """sha256 over the package-relative names and contents (as ``read`` gives them) of
    ``files``."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0")
        digest.update(read(path) + b"\0")
    return digest.hexdigest()


def executable_code(path: Path) -> bytes:
    """The statements of a Python file without what never runs: comments, layout, and
    string statements (docstrings). An edit to the words of a module leaves its runs valid;
    any edit to what it executes does not."""

    def words(n: ast.AST) -> bool:
        return isinstance(n, ast.Expr) and isinstance(getattr(n.value, "value", None), str)

    tree = ast.parse(path.read_bytes())
    for node in ast.walk(tree):
        if isinstance(getattr(node, "body", None), list):
            node.body = [n for n in node.body if not words(n)] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.unparse(tree).encode()


def training_code_version() -> str:
    """Code version of what trains a checkpoint (:data:`TRAINING_CODE`): the files' bytes
    (the checkpoints trained so far are keyed by it; a change to its words retrains)."""
    return code_version(_files(TRAINING_CODE))


def merge_code_version() -> str:
    """Code version of everything a run's numbers depend on: what the package's Python files
    less :data:`MERGE_CODE_EXCLUDED` execute (:func:`executable_code`)."""

    def excluded(path: Path) -> bool:
        name = path.relative_to(PACKAGE).as_posix()
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in MERGE_CODE_EXCLUDED)

    return code_version([p for p in _files(["."]) if not excluded(p)], executable_code)


def git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when the package has uncommitted changes
    (``None`` outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=PACKAGE, timeout=10).stdout  # fmt: skip

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", str(PACKAGE)).strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    from symmerge import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "symmerge": __version__}
    for name in ("torch", "numpy", "scipy", "numba", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model, logical CPUs, GPU (or ``None``) and torch's intra-op threads."""
    import torch

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``sys.argv`` by default), machine paths named by variable."""
    args = list(sys.argv if argv is None else argv)
    if args:
        args[0] = Path(args[0]).name
    return portable(" ".join(shlex.quote(a) for a in args))


def portable(text: str) -> str:
    """``text`` with the value of every path variable replaced by ``$NAME``."""
    for name in PATH_VARIABLES:
        value = os.environ.get(name)
        if value and os.path.abspath(value) != os.path.abspath(os.sep):
            text = text.replace(os.path.abspath(value), f"${name}").replace(value, f"${name}")
    return text


def now() -> str:
    """The current UTC time, to the second (ISO 8601)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
