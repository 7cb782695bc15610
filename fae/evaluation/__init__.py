"""Evaluation: the robustness sweep under corrupted test images."""

from fae.evaluation.sweep import DEFAULT_NUS, DEFAULT_SIGMAS, PerSampleErrors, RobustnessSweep

__all__ = ["DEFAULT_NUS", "DEFAULT_SIGMAS", "PerSampleErrors", "RobustnessSweep"]
