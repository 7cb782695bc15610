"""Evaluation: the robustness sweep under corrupted test images, sample quality (FID/KID) and reports."""

from fae.evaluation.sweep import DEFAULT_NUS, DEFAULT_SIGMAS, PerSampleErrors, RobustnessSweep

__all__ = ["DEFAULT_NUS", "DEFAULT_SIGMAS", "PerSampleErrors", "RobustnessSweep"]
