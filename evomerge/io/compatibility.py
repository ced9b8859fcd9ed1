"""Can these checkpoints be merged tensor by tensor? Say exactly why not, before any work starts."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from evomerge.errors import EvomergeError

if TYPE_CHECKING:  # checkpoint.py imports this module to refuse what it cannot merge
    from evomerge.io.checkpoint import Checkpoint

# Config keys that must agree for a tensor-wise merge to make sense; other keys (dropout, rope
# scaling, chat templates) may differ and the base model's values are kept.
_MUST_MATCH = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
_FIX = {
    "model_type": "merge only fine-tunes of one base model: different families share no weights to average "
    "(a Llama and a Qwen2 differ in vocabulary, widths and tensor layout, even at one size)",
    "num_hidden_layers": "merge only models fine-tuned from the same base model "
    "(data-flow-space merging, genome=dfs, can combine models with different layer counts)",
}
# Config keys and tensor-name parts that only a model with a non-text encoder has.
_MULTIMODAL_KEYS = ("vision_config", "audio_config", "speech_config")
_MULTIMODAL_PARTS = {"vision_tower", "vision_model", "visual", "multi_modal_projector", "audio_tower"}
# Non-float dtypes that are buffers rather than packed weights (position ids, attention masks).
_BUFFER_DTYPES = {"I64", "BOOL", "int64", "bool"}
_UNQUANTIZED = (
    "merge the unquantized checkpoint it was made from (bf16, fp16 or fp32, often the repository without "
    "GPTQ/AWQ/FP8 in its name) and quantize the merged model afterwards"
)


def check_mergeable(*, ref: str, config: Mapping, names: Sequence[str], non_float: Mapping[str, str]) -> None:
    """Refuse a checkpoint no tensor-wise merge can use: quantized, multimodal, or holding non-float tensors.

    ``non_float`` maps the names of tensors that are not floating point to their stored dtype.
    """
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "unknown method") if isinstance(quantization, Mapping) else ""
        raise EvomergeError(
            f"'{ref}' is quantized ({method}, says its config's quantization_config): its weights are stored "
            "compressed (packed integers or 8-bit floats, with scales), which cannot be averaged tensor by tensor",
            _UNQUANTIZED,
        )
    keys = [key for key in _MULTIMODAL_KEYS if key in config]
    parts = sorted({part for name in names for part in name.split(".")} & _MULTIMODAL_PARTS)
    if keys or parts:
        evidence = f"its config has {keys[0]}" if keys else f"it holds tensors under '{parts[0]}.'"
        kind = (config.get("architectures") or [config.get("model_type", "a model")])[0]
        raise EvomergeError(
            f"'{ref}' is a multimodal checkpoint ({kind}: {evidence}), and evomerge merges text-only language models",
            "extract the text model of each checkpoint first (load its language model, e.g. the family's "
            "*ForCausalLM class, and save_pretrained it: a config without vision_config and no vision tensors), "
            "then merge those folders",
        )
    if non_float:
        name, dtype = next(iter(non_float.items()))
        if dtype in _BUFFER_DTYPES:
            raise EvomergeError(
                f"'{ref}' holds tensor '{name}' stored as {dtype}: a buffer, not a weight, which a merge cannot average",
                "save the model again with a current transformers (from_pretrained, then save_pretrained), "
                "which leaves such buffers out",
            )
        raise EvomergeError(
            f"'{ref}' holds tensor '{name}' stored as {dtype}, not as floating point: it is quantized "
            "(GPTQ and AWQ pack weights into I32 or U8, FP8 checkpoints store F8_E4M3), and quantized "
            "weights cannot be averaged tensor by tensor",
            _UNQUANTIZED,
        )


def check_compatible(
    reference: Checkpoint, others: Sequence[Checkpoint], *, vocabulary: Collection[str] = (), remapped: bool = False
) -> None:
    """Raise an ``EvomergeError`` naming the first architecture, tensor-name or shape mismatch.

    ``vocabulary`` names the tensors whose rows are tokens; with ``remapped`` (a tokenizer_source) their
    rows are matched by token text, so only their other sizes must agree.
    """
    for other in others:
        for key in _MUST_MATCH:
            mine, theirs = reference.config.get(key), other.config.get(key)
            if mine != theirs:
                raise EvomergeError(
                    f"'{other.ref}' has {key} = {theirs} but '{reference.ref}' has {key} = {mine}, "
                    "so their tensors cannot be merged one to one",
                    _FIX.get(key, "merge only models fine-tuned from the same base model (these differ in size)"),
                )
        missing = sorted(set(reference.names) - set(other.names))
        extra = sorted(set(other.names) - set(reference.names))
        if missing or extra:
            example = missing[0] if missing else extra[0]
            raise EvomergeError(
                f"'{other.ref}' and '{reference.ref}' hold different tensors "
                f"({len(missing)} missing, {len(extra)} extra, e.g. '{example}')",
                "merge models of one architecture saved the same way",
            )
        for name in reference.names:
            mine, theirs = reference.shape(name), other.shape(name)
            if name in vocabulary and mine[1:] == theirs[1:] and mine[0] != theirs[0]:
                if remapped:
                    continue
                raise EvomergeError(
                    f"'{other.ref}' has {theirs[0]} token rows in '{name}' but '{reference.ref}' has {mine[0]}: "
                    "their vocabularies differ (an added token, or resized embeddings), so row i is not the "
                    "same token in both",
                    "add 'tokenizer_source: base' to the recipe (the base's vocabulary; 'union' for every "
                    "model's tokens, or a merged model's path for its vocabulary): rows are then matched by "
                    "token text, as mergekit does",
                )
            if mine != theirs:
                raise EvomergeError(
                    f"tensor '{name}' has shape {list(other.shape(name))} in '{other.ref}' but "
                    f"{list(reference.shape(name))} in '{reference.ref}'",
                    "merge models with the same sizes",
                )
