"""Langevin samplers: one update core, several kernels, schedules passed in from outside."""

from .core import GaussianNoise, Kernel, langevin_move_
from .kernels import KERNELS, build_kernel, build_psgld, build_sghmc, build_sgld, build_sgnht
from .schedules import Constant, Cosine, Cyclical, PolynomialDecay, Schedule, as_schedule

__all__ = [
    "GaussianNoise", "Kernel", "langevin_move_", "KERNELS", "build_kernel", "build_psgld", "build_sghmc",
    "build_sgld", "build_sgnht",
    "Constant", "Cosine", "Cyclical", "PolynomialDecay", "Schedule", "as_schedule",
]
