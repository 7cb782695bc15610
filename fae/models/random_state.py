"""Exact resumption's share of the model: the random streams continue where the checkpoint left them.
A checkpoint holds torch's and Python's generator states (and CUDA's); a resumed run restores them, so
that its reparameterised samples and prior draws are those of an uninterrupted run. On several devices
the checkpoint holds rank zero's streams: each other rank moves on to a stream of its own."""

from __future__ import annotations

import random

import torch


def save_random_state(checkpoint: dict) -> None:
    checkpoint["fae_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        checkpoint["fae_rng"]["cuda"] = torch.cuda.get_rng_state_all()


def restore_random_state(checkpoint: dict, trainer) -> None:
    state = checkpoint.get("fae_rng")
    if state is None:
        return
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if trainer is not None and trainer.world_size > 1:  # the checkpoint holds rank zero's streams
        torch.manual_seed(torch.randint(2**62, ()).item() + trainer.global_rank)
