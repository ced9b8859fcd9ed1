"""How big each toy world is and how long each of its models trains."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WorldSpec:
    """Model shape and training schedule of one world size.

    The language expert trains only the L2 rows, so its learning rate can be higher than the math
    expert's, which moves every weight and must stay gentle to keep its task vector small.
    ``l2_offset_scale`` sets how far each L2 embedding starts from its L1 twin (a shared offset, in units of
    the mean L1 row norm): far enough that the base cannot read L2, near enough that the language expert
    pulls the rows back onto their twins instead of learning a separate path (TOYWORLD.md, rounds 3-4).
    ``align_weight`` weighs the parallel-data loss that makes the base's layers see an L2 sentence as they
    see its L1 translation; ``drift_steps``/``drift_lr`` are the language expert's second stage, continued
    pre-training of every weight on L2 text alone, which costs it the base's arithmetic.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    math_lr: float
    lang_lr: float
    replay_fraction: float
    base_math_fraction: float
    l2_offset_scale: float
    code_switch_fraction: float
    align_weight: float
    drift_steps: int
    drift_lr: float

    @property
    def incompatible_hidden_size(self) -> int:
        return self.hidden_size + 2 * self.num_heads * 4

    @property
    def incompatible_num_layers(self) -> int:
        return self.num_layers + 1


FULL = WorldSpec(
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    intermediate_size=384,
    batch_size=64,
    base_steps=900,
    base_lr=2e-3,
    expert_steps=300,
    math_lr=1e-3,
    lang_lr=3e-3,
    replay_fraction=0.3,
    base_math_fraction=0.05,
    l2_offset_scale=2.5,
    code_switch_fraction=0.3,
    align_weight=1.0,
    drift_steps=200,
    drift_lr=2e-3,
)
# The same recipe, small and short: the test suite's world (seconds to build).
TINY = replace(
    FULL,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    batch_size=32,
    base_steps=120,
    base_lr=3e-3,
    expert_steps=40,
    drift_steps=20,
)
SPECS = {"full": FULL, "tiny": TINY}

# Each build runs on this many threads whatever the machine has: CPU kernels sum in a thread-dependent
# order, so a fixed count is what makes the same seed give the same tensors. One thread, because at
# these sizes (hidden 128, batches of 64 short sentences) a second thread was slower on a shared 2-core
# machine (measured 118-140 vs 160-176 ms per full-size step).
TORCH_THREADS = 1
