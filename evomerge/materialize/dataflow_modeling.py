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


class DataFlowLlamaConfig(LlamaConfig):
    model_type = "evomerge_dataflow_llama"
    input_scales: list[float] | None = None  # one per decoder layer; None means all 1


class DataFlowLlamaForCausalLM(ScaledInputs, LlamaForCausalLM):
    config_class = DataFlowLlamaConfig


class DataFlowMistralConfig(MistralConfig):
    model_type = "evomerge_dataflow_mistral"
    input_scales: list[float] | None = None


class DataFlowMistralForCausalLM(ScaledInputs, MistralForCausalLM):
    config_class = DataFlowMistralConfig


class DataFlowQwen2Config(Qwen2Config):
    model_type = "evomerge_dataflow_qwen2"
    input_scales: list[float] | None = None


class DataFlowQwen2ForCausalLM(ScaledInputs, Qwen2ForCausalLM):
    config_class = DataFlowQwen2Config


class DataFlowQwen3Config(Qwen3Config):
    model_type = "evomerge_dataflow_qwen3"
    input_scales: list[float] | None = None


class DataFlowQwen3ForCausalLM(ScaledInputs, Qwen3ForCausalLM):
    config_class = DataFlowQwen3Config


class DataFlowGemma2Config(Gemma2Config):
    model_type = "evomerge_dataflow_gemma2"
    input_scales: list[float] | None = None


class DataFlowGemma2ForCausalLM(ScaledInputs, Gemma2ForCausalLM):
    config_class = DataFlowGemma2Config


class DataFlowGemma3TextConfig(Gemma3TextConfig):
    model_type = "evomerge_dataflow_gemma3_text"
    input_scales: list[float] | None = None


class DataFlowGemma3ForCausalLM(ScaledInputs, Gemma3ForCausalLM):
    config_class = DataFlowGemma3TextConfig


class DataFlowPhi3Config(Phi3Config):
    model_type = "evomerge_dataflow_phi3"
    input_scales: list[float] | None = None


class DataFlowPhi3ForCausalLM(ScaledInputs, Phi3ForCausalLM):
    config_class = DataFlowPhi3Config


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
