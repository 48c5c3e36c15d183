"""What every frozen teacher reports about itself: a hash of the weights it was loaded with."""

import hashlib

import torch


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, shapes, dtypes and bytes): identifies the weights
    a teacher was loaded with; the teacher cache keys on it."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
