"""Run the test suite against an *installed* netpoll (a wheel), not the source tree.

    python .ci/installed_tests.py PROJECT_DIR [pytest args...]

Copies tests/, examples/, docs/, fuzz/, README.md and pyproject.toml (pytest's
settings) from PROJECT_DIR into a temporary directory, checks that `netpoll`
imports from outside PROJECT_DIR (site-packages), then runs pytest there.
Used by .ci/wheel and as cibuildwheel's test-command. Exits with pytest's
status (2 when netpoll would come from the source tree).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    project = Path(sys.argv[1]).resolve()
    pytest_args = sys.argv[2:]
    with tempfile.TemporaryDirectory(prefix="netpoll-installed-") as tmp:
        work = Path(tmp)
        for name in ("tests", "examples", "docs", "fuzz"):
            if (project / name).is_dir():
                shutil.copytree(project / name, work / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("README.md", "pyproject.toml"):
            shutil.copy2(project / name, work / name)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = subprocess.run(
            [sys.executable, "-c", "import netpoll; print(netpoll.__file__)"],
            cwd=work, env=env, capture_output=True, text=True)
        if where.returncode != 0:
            print(where.stderr, file=sys.stderr)
            return 2
        path = Path(where.stdout.strip()).resolve()
        print(f"installed-tests: netpoll imported from {path}", flush=True)
        if project in path.parents:
            print(f"installed-tests: FAIL: netpoll comes from the source tree {project}",
                  file=sys.stderr)
            return 2
        # cwd is the copy: `python -m pytest` puts it (not the project) on sys.path.
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--rootdir", str(work), *pytest_args]
        print("installed-tests:", " ".join(cmd), flush=True)
        return subprocess.call(cmd, cwd=work, env=env)


if __name__ == "__main__":
    sys.exit(main())
