"""A trained model from its checkpoint, built as the checkpoint records it: its family's class from
the class path the CLI records, its arguments in today's form (fae.checkpoint.upgrade_hparams: every
checkpoint a `fae fit` wrote loads, those of earlier versions of fae too), its weights."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import instantiate_module

from fae.checkpoint import checkpoint_facts, read_checkpoint
from fae.errors import UserError
from fae.models.base import AutoEncoder
from fae.plan import import_class


def load_model(path: Path) -> AutoEncoder:
    """The model a `fae fit` checkpoint holds, in eval mode on the CPU."""
    facts = checkpoint_facts(path)  # a missing or corrupt file: one line
    family = import_class(facts.class_path) if facts.class_path else None
    if not (isinstance(family, type) and issubclass(family, AutoEncoder)):
        raise UserError(
            f"{path} does not record a fae model family ({facts.class_path or 'none'}): give a `fae fit` checkpoint"
        )
    model = instantiate_module(family, facts.hparams)
    checkpoint = read_checkpoint(path)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
