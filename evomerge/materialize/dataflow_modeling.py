"""evomerge data-flow model: a Llama whose decoder layer k multiplies its input by ``input_scales[k]``.

evomerge copies this file into an exported data-flow model whose path scales the hidden state where
it changes source (Akiba et al. 2024, arXiv:2403.13187, section 3.2). Load such a folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

Why code and not folded weights: a scale s on a layer's input multiplies the residual stream itself,
which no weight of the layer carries, and moving s into later layers' weights would need each
RMSNorm to use eps / s_cumulative**2 (RMSNorm(s*h) = w*h / sqrt(mean(h**2) + eps / s**2)), which one
``rms_norm_eps`` cannot express. The model type is evomerge's own, so that loading without
``trust_remote_code`` fails instead of silently running a plain Llama without the scales.
Needs only transformers (written against 5.x).
"""

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel


class DataFlowLlamaConfig(LlamaConfig):
    model_type = "evomerge_dataflow_llama"
    input_scales: list[float] | None = None  # one per decoder layer; None means all 1


class ScaledInputDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DataFlowLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.input_scale = 1.0 if config.input_scales is None else float(config.input_scales[layer_idx])

    def forward(self, hidden_states, *args, **kwargs):
        # The same operation, in the same dtype, as evomerge's search-time PathLayer: the scores match exactly.
        if self.input_scale != 1.0:
            hidden_states = hidden_states * self.input_scale
        return super().forward(hidden_states, *args, **kwargs)


class DataFlowLlamaModel(LlamaModel):
    config_class = DataFlowLlamaConfig

    def __init__(self, config: DataFlowLlamaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(ScaledInputDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class DataFlowLlamaForCausalLM(LlamaForCausalLM):
    config_class = DataFlowLlamaConfig

    def __init__(self, config: DataFlowLlamaConfig) -> None:
        super().__init__(config)
        self.model = DataFlowLlamaModel(config)
        self.post_init()
