"""The misuse fuzzer (tests/misuse_fuzz.py) as a test: random sequences of
public calls with hostile values from several threads, in a subprocess with
a deadline. It fails on a crash (a signal), a hang (a call or the final
shutdown past its bound) or a call raising an undocumented exception class
(OverflowError, a MemoryError for a small size, ...)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import netpoll

HERE = os.path.dirname(os.path.abspath(__file__))
# The script imports the same netpoll as these tests, wherever it lives.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (os.path.dirname(os.path.dirname(os.path.abspath(netpoll.__file__))),
                os.environ.get("PYTHONPATH")) if p))
SEED = int(os.environ.get("NETPOLL_FUZZ_SEED", "15"))


@pytest.mark.timeout(120)
def test_misuse_fuzz_neither_crashes_nor_hangs_nor_raises_undocumented_errors():
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "misuse_fuzz.py"), str(SEED),
                            "10"], capture_output=True, text=True, timeout=100, env=ENV)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzzer hung past its own deadlines (seed {SEED}):\n"
                    f"{(e.stderr or b'')[-4000:]!r}")
    what = {1: "a call raised an undocumented exception, or the process froze",
            3: "a call or the shutdown hung"}.get(p.returncode, "it crashed")
    assert p.returncode == 0, (f"{what} (exit {p.returncode}, seed {SEED}):\n"
                               f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    # Known findings in other files are printed; show them in the test's output.
    print(p.stdout, p.stderr, sep="\n")
