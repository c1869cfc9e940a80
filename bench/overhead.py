"""Python overhead of the API per training step, on a tiny map where the kernels cost ~nothing.

    python -m bench.overhead [--backend cpu] [--shape 2,4,8,8] [--repeats 15]

Times, in microseconds (the minimum over repeats of the mean of a burst of calls, single thread):
Times are CPU time of the calling thread (time.thread_time), robust to a loaded machine.
- `autograd floor`: `(x * 2).sum()` and `torch.autograd.grad`, the least any differentiable step
  costs on this machine;
- `op`: the backend's forward op called directly, then `torch.autograd.grad` (the op's own
  autograd: fake kernels aside, one forward and one backward op call);
- `dsnt_loss`, `DSNTLoss`, `fused_dsnt` (+ grad), `dsnt` (+ grad): the public calls, whose
  difference to `op` is the API's validation and dispatch;
- `dsnt_loss, tensor beta`: with a learnable (B, L)-broadcast beta, whose values are checked.
"""

import argparse
import time

import torch

import dsnt_cuda
from dsnt_cuda import backends


def _best_mean_us(fn, repeats: int, burst: int = 200) -> float:
    for _ in range(burst // 4):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(burst):
            fn()
        best = min(best, (time.thread_time() - start) / burst)
    return best * 1e6


def steps(backend: str, shape) -> dict:
    """name -> a zero-argument training (or inference) step on `backend`."""
    logits = torch.randn(shape, requires_grad=True)
    target = torch.rand(shape[0], shape[1], len(shape) - 2) * 1.6 - 0.8
    beta = torch.full((shape[1],), 1.5, requires_grad=True)
    heatmaps = dsnt_cuda.flat_softmax(logits.detach()).requires_grad_(True)
    criterion = dsnt_cuda.DSNTLoss(backend=backend)
    op = backends.forward_op(backend)
    options = ("softmax", 1.0, True, "js", 1.0, "euclidean", 1.0)

    def grad(output, inputs=(logits,)):
        return torch.autograd.grad(output, inputs)

    return {
        "autograd floor": lambda: grad((logits * 2).sum()),
        "op": lambda: grad(op(logits, target, None, None, None, *options)[4]),
        "dsnt_loss": lambda: grad(dsnt_cuda.dsnt_loss(logits, target, backend=backend).loss),
        "DSNTLoss": lambda: grad(criterion(logits, target).loss),
        "dsnt_loss, tensor beta": lambda: grad(
            dsnt_cuda.dsnt_loss(logits, target, beta=beta, backend=backend).loss, (logits, beta)),
        "fused_dsnt": lambda: grad(dsnt_cuda.fused_dsnt(logits, backend=backend).sum()),
        "dsnt (compat)": lambda: grad(dsnt_cuda.dsnt(heatmaps).sum(), (heatmaps,)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, help="default: cpu when built, else reference")
    parser.add_argument("--shape", default="2,4,8,8", help="B,L,S_1[,S_2[,S_3]] (default 2,4,8,8)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    backend = args.backend or ("cpu" if "cpu" in dsnt_cuda.available_backends("cpu") else "reference")
    shape = tuple(int(s) for s in args.shape.split(","))
    results = {name: _best_mean_us(fn, args.repeats) for name, fn in steps(backend, shape).items()}
    print(f"backend {backend}, logits {shape}, 1 thread; microseconds per step (best mean):")
    for name, us in results.items():
        same_op_call = name in ("dsnt_loss", "DSNTLoss")  # the op call that `op` times, plus the API
        extra = f"   (+{us - results['op']:.0f} over op)" if same_op_call else ""
        print(f"  {name:24s} {us:8.1f}{extra}")


if __name__ == "__main__":
    main()
