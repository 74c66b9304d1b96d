"""torchrun launches of the multi-process tests (gloo on CPU)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

# torch 2.13's gloo can abort a rank at interpreter exit, after its work is done: a gloo worker thread frees a job
# during shutdown (a core dump showed it); the rank dies with SIGABRT and this line, torchrun then fails. Seen in a
# few of many short runs, never mid-run.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """One thread per rank, no GPU (the ranks run gloo on CPU also on a CUDA machine), this test's sys.path."""
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path),
                **extra)


def torchrun(nproc: int, args: list, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node N <args>` on a free port; fails the test unless it succeeded.

    A launch whose only failures are ranks killed by GLOO_EXIT_ABORT (exit code -6; a Python exception exits with 1)
    passes here: the test's own checks of what the ranks wrote decide (a rank that died before writing leaves
    nothing to pass them).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *map(str, args)]
    proc = subprocess.run(cmd, env=cpu_env() if env is None else env, capture_output=True, text=True,
                          timeout=timeout)
    # torchrun's failure summary lists each failed rank's exit code: SIGABRT (-6) with the gloo message, and SIGTERM
    # (-15) for ranks torchrun stopped after it
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr))
    exit_abort = GLOO_EXIT_ABORT in proc.stderr and "-6" in codes and codes <= {"-6", "-15"}
    assert proc.returncode == 0 or exit_abort, proc.stderr[-4000:]
    return proc
