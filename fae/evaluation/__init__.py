"""Evaluation: the robustness sweep under corrupted test images, sample quality (FID/KID), the rows they
make and where they go, and the tools that read them (`fae report`, `fae sample`, `fae classifier`).

The sweep is imported when first asked for, so that reading results (fae.evaluation.results) needs
neither torch nor Lightning."""

from __future__ import annotations

__all__ = ["DEFAULT_NUS", "DEFAULT_SIGMAS", "PerSampleErrors", "RobustnessSweep"]


def __getattr__(name: str):
    if name in __all__:
        from fae.evaluation import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'fae.evaluation' has no attribute {name!r}")
