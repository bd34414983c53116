"""Report phases of a Kiln exec job from Python, without spawning `kiln phase`.

Standard library only. Inside a job started with `kiln submit exec`, the agent names a Unix
socket in KILN_PHASE_SOCKET; `phase()` writes one JSON line to it and waits for the agent's
"ok". The agent adds its own reading of the job's memory (NVML per process over the job's whole
process tree on a GPU, resident memory on a CPU slot), so a phase costs one round trip.

    import kiln_phase
    kiln_phase.phase("model_loaded", bytes={"weights": n_bytes})
    kiln_phase.phase("optimizer_done", step=step, metrics={"loss": loss})

`bytes` are tensor bytes by category (weights, grads, optimizer_state, activations, kv_cache…);
with PyTorch, `torch_cuda_bytes()` gives the allocator's view to pass along.
"""

import json
import os
import socket
import time

PHASE_SOCKET_ENV = "KILN_PHASE_SOCKET"


class PhaseError(RuntimeError):
    """The phase could not be reported."""


def in_job():
    """Whether this process runs inside a Kiln exec job."""
    return PHASE_SOCKET_ENV in os.environ


def phase(name, step=0, metrics=None, bytes=None, timeout=10.0):
    """Report phase `name` (at `step`) with optional metrics {name: number} and tensor bytes
    {category: int}. Raises PhaseError outside a job or when the agent does not take it."""
    path = os.environ.get(PHASE_SOCKET_ENV)
    if not path:
        raise PhaseError(
            "not inside a Kiln exec job (%s is not set): phases are reported by the exec job "
            "they run in" % PHASE_SOCKET_ENV
        )
    if not name:
        raise PhaseError("the phase needs a name")
    report = {
        "phase": str(name),
        "step": int(step),
        "at_ms": int(time.time() * 1000),
        "cuda_free": 0,
        "cuda_total": 0,
        "host_rss": 0,
        "tensor_bytes": {str(k): int(v) for k, v in (bytes or {}).items()},
        "metrics": {str(k): float(v) for k, v in (metrics or {}).items()},
    }
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall((json.dumps(report) + "\n").encode())
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                answer += chunk
    except OSError as e:
        raise PhaseError("cannot reach the agent's phase socket %s: %s" % (path, e)) from e
    answer = answer.decode(errors="replace").strip()
    if answer != "ok":
        raise PhaseError("the agent refused the phase: %s" % answer)


def torch_cuda_bytes(device=None):
    """{'allocated': …, 'reserved': …} from PyTorch's CUDA allocator (empty without CUDA)."""
    try:
        import torch  # noqa: F401 (optional)
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
    }


if __name__ == "__main__":
    import sys

    try:
        phase(sys.argv[1] if len(sys.argv) > 1 else "")
    except PhaseError as e:
        print("kiln_phase: %s" % e, file=sys.stderr)
        sys.exit(1)
