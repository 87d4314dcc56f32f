"""Run a function on several gloo processes on the CPU and collect each process's tensors.

``start(compute, world, directory)`` spawns ``world`` processes, each calling ``compute(rank, world)`` inside an
initialized gloo process group and saving the returned ``{key: tensor}`` as safetensors; the caller may work
meanwhile; ``finish(...)`` waits, turns a failure into a test failure with every worker's traceback, and returns the
tensors of every rank. ``compute`` must be a module-level function (it is pickled by reference).
"""

import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file


def _worker(rank: int, world: int, init_file: str, out_dir: str, compute) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        try:
            assert dist.get_world_size() == world and dist.get_rank() == rank
            out = {k: v.detach().contiguous() for k, v in compute(rank, world).items()}
            save_file(out, os.path.join(out_dir, f"rank{rank}.safetensors"))
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        # torch's spawn reports only the first failure it sees, often the peer's "connection closed"; every worker
        # leaves its own traceback for the parent.
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def start(compute, world: int, directory):
    directory.mkdir(parents=True, exist_ok=True)
    return mp.spawn(_worker, args=(world, str(directory / "rendezvous"), str(directory), compute), nprocs=world,
                    join=False)


def finish(context, world: int, directory, timeout_s: float = 240):
    """Wait for the processes of :func:`start`; returns ``[tensors of rank 0, rank 1, ...]``."""
    begun = time.perf_counter()
    try:
        while not context.join(timeout=1):
            if time.perf_counter() - begun > timeout_s:
                pytest.fail(f"the {world}-process run did not finish within {timeout_s} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        logs = sorted(directory.glob("rank*.error"), key=lambda p: p.stat().st_mtime)
        details = "\n".join(f"--- {p.stem}, in order of failure ---\n{p.read_text()}" for p in logs)
        pytest.fail(f"a worker of the {world}-process run failed:\n{details or error}", pytrace=False)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join()
    return [load_file(str(directory / f"rank{r}.safetensors")) for r in range(world)]
