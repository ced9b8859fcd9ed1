"""The evaluation cache's key: a plain recipe as one line of JSON with sorted keys.

The standard library's serializer gives one line per distinct recipe (dict order never matters, floats
are written by ``repr``, so they read back exactly), and it refuses values that are not plain data
(a numpy scalar) rather than spelling them some other way.

Run folders written before this used one line of YAML as the key. They resume unchanged: a resume
computes each logged row's key again from the recipe the row holds (``search/loop.py::resume_state``),
so an old key never meets a new one.
"""

from __future__ import annotations

import json


def canonical_key(plain: dict) -> str:
    """The cache key of a plain recipe (``Recipe.to_plain()``, ``DataFlowRecipe.to_plain()``)."""
    return json.dumps(plain, sort_keys=True, separators=(", ", ": "))
