"""Settings of the proxies beyond the paper: the scaled merge and the Fisher merge."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megablocks_ablate.config import Config, doc
from megablocks_ablate.errors import ConfigError


@dataclass
class ScaledSpec(Config):
    """The ``scaled`` proxy (beyond the paper; runner/scaled.py): seed + lambda x
    (merged - seed), lambda fitted on half of the validation mixtures."""

    lambdas: list[float] = doc(
        "the lambdas tried on the fit half (1 = the plain merge)",
        default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0],
    )
    split_seed: int = doc("seed of the fit / held-out split of the validation mixtures", 0)

    def validate(self) -> None:
        bad = [x for x in self.lambdas if not math.isfinite(x) or x <= 0]
        if not self.lambdas or bad:
            raise ConfigError(
                f"scaled.lambdas: expected a non-empty list of finite numbers > 0, got "
                f"{self.lambdas}"
            )


@dataclass
class FisherSpec(Config):
    """The ``fisher`` proxy (beyond the paper; runner/fisher.py): each parameter merged in
    proportion to the unit models' diagonal Fisher on their own training data."""

    sequences: int = doc(
        "training sequences per unit model its Fisher is averaged over (the first of its "
        "data order; 512 of 64 tokens is one pass over a 32K-token base unit)",
        512,
    )
    batch: int = doc(
        "sequences per squared gradient (1: the per-sequence empirical Fisher; 8 measured "
        "as good on both built-in corpora at an eighth of the backward passes)",
        8,
    )
    eps: float = doc(
        "floor added to every Fisher, as a fraction of the tensor's mean Fisher over the "
        "merged units (small: follow the Fisher; large: the plain average)",
        0.01,
    )

    power: float = doc(
        "exponent on each Fisher before merging (1: the minimiser of the quadratic model "
        "of the summed losses; larger: each parameter follows the unit that constrains it "
        "most more closely)",
        1.0,
    )
    stretch: float = doc(
        "exponent gamma of the relative stretch (merge/stretch.py): each tensor's merged "
        "displacement times (its shortening / the mean over groups of the study's models "
        "of the mixture's size) "
        "** gamma, undoing part of the shortening averaging causes (0: the Fisher merge "
        "as is; 0.25 met all four fidelity targets on both built-in corpora over seven "
        "data orders, four of them out of sample: docs/fidelity.md)",
        0.25,
    )
    stretch_max_models: int = doc(
        "the largest mixture, in merged models, the stretch applies to; larger ones get "
        "the Fisher merge unstretched (2: measured to help on pairs on both built-in "
        "corpora, and to hurt on triples in one study each: docs/fidelity.md)",
        2,
    )

    def validate(self) -> None:
        if self.stretch_max_models < 2:
            raise ConfigError(
                f"fisher.stretch_max_models: expected an integer >= 2, got "
                f"{self.stretch_max_models} (fisher.stretch=0 turns the stretch off)"
            )
        if not (math.isfinite(self.stretch) and self.stretch >= 0):
            raise ConfigError(f"fisher.stretch: expected a finite number >= 0, got {self.stretch}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise ConfigError(f"fisher.power: expected a finite number > 0, got {self.power}")
        if self.sequences < 1 or self.batch < 1:
            raise ConfigError(
                f"fisher.sequences and fisher.batch: expected integers >= 1, got "
                f"{self.sequences} and {self.batch}"
            )
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"fisher.eps: expected a finite number > 0, got {self.eps}")
