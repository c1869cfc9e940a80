"""DistributedDataParallel: two CPU processes (gloo) train with `DSNTLoss` on halves of a batch and
get the single-process gradients of the whole batch, step after step.

Equal halves make it exact: `DSNTLoss` averages over its (B/2)·L keypoints, DDP averages the two
ranks' gradients, and the mean of two equal-size means is the mean over the whole batch.
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dsnt_cuda import DSNTLoss

from support import CPU_BACKENDS

WORLD = 2
STEPS = 3
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 1, 12, 10, generator=g)
    target = torch.rand(8, 3, 2, generator=g) * 1.6 - 0.8
    mask = torch.ones(8, 3)
    mask[1, 0] = mask[6, 2] = 0.0  # one dropped keypoint per half: equal mask sums per rank
    return images, target, mask


def _train(model, criterion, images, target, mask):
    """STEPS of SGD; returns the gradients of each step (flattened) and the final parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        criterion(model(images), target, mask).loss.backward()
        history.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return torch.stack(history), params


def _worker(rank, port, backends, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        images, target, mask = _batch()
        half = slice(rank * 4, rank * 4 + 4)
        for backend in backends:  # one process group for all backends: spawning costs seconds
            model = nn.parallel.DistributedDataParallel(_model())
            grads, params = _train(model, DSNTLoss(backend=backend), images[half], target[half], mask[half])
            torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"{backend}-rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    context = mp.start_processes(
        _worker,
        args=(_free_port(), CPU_BACKENDS, str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)

    for backend in CPU_BACKENDS:
        single_grads, single_params = _train(_model(), DSNTLoss(backend=backend), *_batch())
        for rank in range(WORLD):
            result = torch.load(tmp_path / f"{backend}-rank{rank}.pt")
            torch.testing.assert_close(
                result["grads"], single_grads, rtol=1e-5, atol=1e-6, msg=f"backend {backend}, rank {rank}"
            )
            torch.testing.assert_close(
                result["params"], single_params, rtol=1e-5, atol=1e-6, msg=f"backend {backend}, rank {rank}"
            )
