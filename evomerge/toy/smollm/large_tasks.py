"""Larger variants of the SmolLM2 world's objective task and its held-out twin (as ``evomerge.toy.large_tasks``
does for the toy world): each Vellish sum as it is, then after distinct short English context sentences with
no number in them, drawn from the world's seed; the held-out variants from held-out operand pairs only.
"""

from __future__ import annotations

import json
import random

from evomerge.toy.large_tasks import with_contexts
from evomerge.toy.smollm.skills import NAMES, THINGS, VERBS, task_items
from evomerge.toy.smollm.world import COMPLETE_MARKER, SmolWorld
from evomerge.toy.tasks import write_missing_tasks

# 50 x 10 = 500 search items and 500 held-out ones (the issue asks for at least 500 and 300): at about 14 ms
# an item on a 2-core CPU, a candidate costs 7 s on the large task against 0.7 s on the 50-item one.
VARIANTS = 10
CONTEXTS = ("{name} {verb} {thing}.", "{name} {verb} the {thing}.", "{name} {verb} some {thing} today.")


def context(rng: random.Random) -> str:
    return rng.choice(CONTEXTS).format(name=rng.choice(NAMES), verb=rng.choice(VERBS), thing=rng.choice(THINGS))


def large_smol_tasks(world: SmolWorld) -> tuple[str, str]:
    """Write the large combined task and its held-out twin into the world's tasks folder unless they are
    there already; their names, (search, held out)."""
    seed = json.loads((world.root / COMPLETE_MARKER).read_text())["seed"]
    items = task_items(seed)
    item_sets = [
        with_contexts(items[half]["combined"], variants=VARIANTS, context=context, seed=str(seed))
        for half in ("search", "holdout")
    ]
    write_missing_tasks(item_sets, world.tasks_dir)
    return item_sets[0].name, item_sets[1].name
