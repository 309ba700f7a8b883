"""Launching torchrun-style process groups from tests (gloo on CPU, no torchrun binary needed)."""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmd: list[str], world_size: int = 2, timeout: float = 300) -> list[str]:
    """Run ``cmd`` as ranks 0..world_size-1 of one gloo group (RANK/WORLD_SIZE/MASTER_* set as torchrun
    does); asserts every rank exits 0 and returns their stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    port = str(free_port())
    procs = [
        subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for r in range(world_size)
    ]  # fmt: skip
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(out.decode())
    return outs
