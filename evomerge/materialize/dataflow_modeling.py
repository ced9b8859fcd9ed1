"""evomerge data-flow model: a causal LM whose decoder layer k multiplies its input by ``input_scales[k]``.

evomerge copies this file into an exported data-flow model whose path scales the hidden state where
it changes source (Akiba et al. 2024, arXiv:2403.13187, section 3.2). Load such a folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

Why code and not folded weights: a scale s on a layer's input multiplies the residual stream itself,
which no weight of the layer carries, and moving s into later layers' weights would need each
RMSNorm to use eps / s_cumulative**2 (RMSNorm(s*h) = w*h / sqrt(mean(h**2) + eps / s**2)), which one
``rms_norm_eps`` cannot express. Each family's model type is evomerge's own, so that loading without
``trust_remote_code`` fails instead of silently running the plain model without the scales.

Each class is the family's transformers model with one change: a forward pre-hook on decoder layer k
multiplies its input by the scale. A hook rather than a subclassed layer keeps the tensor names
(``model.layers.{k}.*``) and every family's own layer code as they are.
Needs only transformers (written against 5.x).
"""

from functools import partial

from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def _scale_input(layer, args, kwargs, *, scale):
    # The same operation, in the same dtype, as evomerge's search-time PathLayer: the scores match exactly.
    if args:
        return (args[0] * scale, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}


class ScaledInputs:
    """Mixed in before a family's ``...ForCausalLM``: scales decoder layer k's input by ``config.input_scales[k]``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        scales = config.input_scales or [1.0] * config.num_hidden_layers
        for layer, scale in zip(self.model.layers, scales, strict=True):
            if scale != 1.0:
                layer.register_forward_pre_hook(partial(_scale_input, scale=float(scale)), with_kwargs=True)


def _scaled_family(config_class: type, model_class: type, model_type: str) -> tuple[type, type]:
    """The family's config with ``input_scales`` (one per decoder layer; None means all 1) and its
    ``...ForCausalLM`` with ``ScaledInputs``, named DataFlow<name> under evomerge's own ``model_type``."""
    config = type(
        f"DataFlow{config_class.__name__}",
        (config_class,),
        {
            "__module__": __name__,
            "__annotations__": {"input_scales": list[float] | None},
            "model_type": model_type,
            "input_scales": None,
        },
    )
    model = type(
        f"DataFlow{model_class.__name__}", (ScaledInputs, model_class), {"__module__": __name__, "config_class": config}
    )
    return config, model


DataFlowLlamaConfig, DataFlowLlamaForCausalLM = _scaled_family(LlamaConfig, LlamaForCausalLM, "evomerge_dataflow_llama")
DataFlowMistralConfig, DataFlowMistralForCausalLM = _scaled_family(
    MistralConfig, MistralForCausalLM, "evomerge_dataflow_mistral"
)
DataFlowQwen2Config, DataFlowQwen2ForCausalLM = _scaled_family(Qwen2Config, Qwen2ForCausalLM, "evomerge_dataflow_qwen2")
DataFlowQwen3Config, DataFlowQwen3ForCausalLM = _scaled_family(Qwen3Config, Qwen3ForCausalLM, "evomerge_dataflow_qwen3")
DataFlowGemma2Config, DataFlowGemma2ForCausalLM = _scaled_family(
    Gemma2Config, Gemma2ForCausalLM, "evomerge_dataflow_gemma2"
)
DataFlowGemma3TextConfig, DataFlowGemma3ForCausalLM = _scaled_family(
    Gemma3TextConfig, Gemma3ForCausalLM, "evomerge_dataflow_gemma3_text"
)
DataFlowPhi3Config, DataFlowPhi3ForCausalLM = _scaled_family(Phi3Config, Phi3ForCausalLM, "evomerge_dataflow_phi3")


# The model class for each family evomerge exports with scales (keyed by the source's model_type).
SCALED_MODELS = {
    "llama": DataFlowLlamaForCausalLM,
    "mistral": DataFlowMistralForCausalLM,
    "qwen2": DataFlowQwen2ForCausalLM,
    "qwen3": DataFlowQwen3ForCausalLM,
    "gemma2": DataFlowGemma2ForCausalLM,
    "gemma3_text": DataFlowGemma3ForCausalLM,
    "phi3": DataFlowPhi3ForCausalLM,
}
