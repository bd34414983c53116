"""A small PyTorch training loop that reports its phases to Kiln.

Submit it to an agent started with --allow-exec (from the repository root, paths on the agent):

    kiln submit exec --gpus 1 --budget-gb 8 --env PYTHONPATH=$PWD/python --follow -- \
        python3 $PWD/examples/pytorch_train.py --steps 20 --hidden 4096

Each step reports forward_done / backward_done / optimizer_done with the CUDA allocator's bytes;
the agent adds NVML's per-process memory over the whole process tree. Raise --hidden until the
guard kills it to see a KILLED record with the phase it died in (`kiln job ID`,
`kiln telemetry ID --plot mem.png`). Runs on the CPU too (--device cpu), without CUDA bytes.
"""

import argparse

import kiln_phase
import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    model = torch.nn.Sequential(
        torch.nn.Linear(a.hidden, a.hidden), torch.nn.GELU(), torch.nn.Linear(a.hidden, a.hidden)
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kiln_phase.phase("model_loaded", bytes={"weights": weights, **kiln_phase.torch_cuda_bytes()})
    for step in range(1, a.steps + 1):
        x = torch.randn(a.batch, a.hidden, device=dev)
        loss = model(x).pow(2).mean()
        kiln_phase.phase("forward_done", step=step, bytes=kiln_phase.torch_cuda_bytes())
        loss.backward()
        kiln_phase.phase("backward_done", step=step, bytes=kiln_phase.torch_cuda_bytes())
        opt.step()
        opt.zero_grad(set_to_none=True)
        kiln_phase.phase(
            "optimizer_done",
            step=step,
            metrics={"loss": float(loss)},
            bytes=kiln_phase.torch_cuda_bytes(),
        )
    print("trained %d steps, last loss %.4f" % (a.steps, float(loss)))


if __name__ == "__main__":
    main()
