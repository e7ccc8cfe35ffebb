"""Which epochs a training validates: the FP start's and QAT's cadences, shared by the stages that train and
by the cost model (`qat-ladder --plan`), which counts the same validations without importing torch."""

from __future__ import annotations

from typing import Callable


def validated_fp_epochs(epochs: int, interval: int, plateau_epochs: int) -> Callable[[int], bool]:
    """Which FP epochs (1-based) to validate: every `interval`-th, and all from the one before the plateau
    window to the last. The check reads the window in full; before it, it needs the best, which a sparser
    history can only understate, so sparse validation never makes a start look more at plateau than it is."""
    first_dense = epochs - plateau_epochs
    return lambda epoch: epoch % interval == 0 or epoch >= first_dense


def validated_qat_epochs(epochs: int, interval: int, final_epochs: int) -> Callable[[int], bool]:
    """Which QAT epochs (1-based) the trajectory validates: every `interval`-th, and every one of the last
    `final_epochs` (so always the last). The collapse rule's final is the median of the last validations,
    which the settings keep inside the final window. Its best is the highest running median over the
    validations: before the window those are `interval` epochs apart, so a median spans m x interval epochs
    and a peak between two validations is not seen."""
    return lambda epoch: epoch % interval == 0 or epoch > epochs - final_epochs
