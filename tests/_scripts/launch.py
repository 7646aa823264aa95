"""Run a training script in its own process group, with a time limit that kills all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT_S = 120  # a normal run takes seconds; a hang must not stall CI


# gloo's race when a process exits (torch 2.13, traced with gdb; see teardown.py): a gloo worker
# thread that releases a finished collective's tensors after the interpreter began to finalize
# is ended inside a noexcept destructor, and the process aborts (SIGABRT) after its work is
# done. The test scripts end with teardown.exit_worker, which cannot lose it; the scripts that
# are the documentation's examples end as a user's script does (destroy_process_group), and lose
# it about 1 run in 6. A run that fails only so is started again, up to ATTEMPTS times in all;
# anything else fails at once.
TEARDOWN_ABORT = "terminate called without an active exception"
ATTEMPTS = 4


def run_script(
    script: Path,
    *args: str,
    ranks: int | None = None,
    cwd: Path | None = None,
    timeout_s: int = TIMEOUT_S,
) -> str:
    """``python script args`` (under ``torchrun --nproc-per-node ranks`` if given), in ``cwd``
    (the repository's root by default); its output.

    Fails the calling test if the script fails or runs past ``timeout_s``; on a timeout the
    whole process group (launcher and workers) is killed. A run that fails only by gloo's
    teardown abort is repeated (``ATTEMPTS`` runs in all).
    """
    output, returncode = _run_once(script, args, ranks, cwd or ROOT, timeout_s)
    for _ in range(ATTEMPTS - 1):
        if returncode == 0 or TEARDOWN_ABORT not in output:
            break
        output, returncode = _run_once(script, args, ranks, cwd or ROOT, timeout_s)
    assert returncode == 0, output[-3000:]
    return output


def _run_once(
    script: Path, args: tuple[str, ...], ranks: int | None, cwd: Path, timeout_s: int
) -> tuple[str, int]:
    command = [sys.executable]
    if ranks is not None:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [*command, str(script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        # torchrun's workers may sit in sessions of their own, holding the output pipe open.
        subprocess.run(["pkill", "-9", "-f", str(script)], check=False)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            output = "(no output: the workers could not be stopped)"
        pytest.fail(f"{script.name} did not finish within {timeout_s} s:\n{output[-3000:]}")
    return output, process.returncode
