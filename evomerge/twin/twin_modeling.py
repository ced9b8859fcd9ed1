"""evomerge Twin model: shared weights plus exclusive low-rank parts weighted per input by a router.

evomerge copies this file into an exported Twin-Merging model (Lu et al. 2024, arXiv:2406.15479).
Load such a folder with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

For each input row: the shared model reads the row once, a small MLP maps its mean-pooled final hidden
state to softmax weights w over the experts, and the row is then run with every targeted matrix set to
``shared + sum_i w_i * U_i @ V_i`` (and every other tensor, the norms, to ``shared + sum_i w_i * D_i``
with D_i the whole difference: a few numbers per layer). Rows are run one at a time, so a batch gives
each row exactly the result it gets alone. The weights cannot be folded into a static checkpoint: they change with the input.
Each family's model type is evomerge's own, so that loading without ``trust_remote_code`` fails instead
of silently running the shared model alone. Needs only torch and transformers (written against 5.x).
"""

import torch
from torch import nn
from torch.func import functional_call
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast


def factor_key(expert: int, name: str, part: str) -> str:
    """The parameter name of expert ``expert``'s factor ``part`` ("u" or "v") of tensor ``name``."""
    return f"e{expert}__{name.replace('.', '__')}__{part}"


class TwinRouter(nn.Module):
    """hidden state -> expert logits: one hidden layer, as the paper's router."""

    def __init__(self, *, hidden_size: int, router_size: int, num_experts: int) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden_size, router_size)
        self.outer = nn.Linear(router_size, num_experts)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.relu(self.inner(pooled)))


def pooled_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the final hidden state over each row's real (unpadded) tokens."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class RoutedExperts:
    """Mixed in before a family's ``...ForCausalLM``: adds the factors and the router, and routes each row."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.twin_router = TwinRouter(
            hidden_size=config.hidden_size, router_size=config.twin_router_size, num_experts=config.twin_num_experts
        )
        shapes = {}
        for name, ranks in config.twin_ranks.items():
            rows, cols = config.twin_shapes[name]
            for expert, rank in enumerate(ranks):
                shapes[factor_key(expert, name, "u")] = (rows, rank)
                shapes[factor_key(expert, name, "v")] = (rank, cols)
        for name, shape in (config.twin_vector_shapes or {}).items():
            for expert in range(config.twin_num_experts):
                shapes[factor_key(expert, name, "d")] = tuple(shape)
        self.twin_factors = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(shape), requires_grad=False) for key, shape in shapes.items()}
        )

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's weights over the experts, read from the shared model's pooled hidden state."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return torch.softmax(self.twin_router(pooled_hidden(hidden, attention_mask)).float(), dim=-1)

    def routed_weights(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every routed tensor (matrices from their factors, norms from their whole differences) for one row."""
        own = dict(self.named_parameters())
        out = {}
        for name in self.config.twin_ranks:
            shared = own[name]
            delta = torch.zeros_like(shared)
            for expert, weight in enumerate(weights.tolist()):
                u, v = (
                    self.twin_factors[factor_key(expert, name, "u")],
                    self.twin_factors[factor_key(expert, name, "v")],
                )
                delta += weight * (u @ v).to(shared.dtype)
            out[name] = shared + delta
        for name in self.config.twin_vector_shapes or {}:
            shared = own[name]
            delta = torch.zeros_like(shared)
            for expert, weight in enumerate(weights.tolist()):
                delta += weight * self.twin_factors[factor_key(expert, name, "d")].to(shared.dtype)
            out[name] = shared + delta
        return out

    def forward_routed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        """Logits of each row run with its own row of ``weights`` (batch x experts)."""
        rows = []
        for row in range(input_ids.shape[0]):
            tensors = self.routed_weights(weights[row])
            mask = None if attention_mask is None else attention_mask[row : row + 1]
            decoder = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
            hidden = functional_call(
                self.model, decoder, args=(), kwargs={"input_ids": input_ids[row : row + 1], "attention_mask": mask}
            ).last_hidden_state
            head = tensors.get("lm_head.weight", self.lm_head.weight)
            if self.config.tie_word_embeddings:
                head = tensors.get("model.embed_tokens.weight", head)
            rows.append(nn.functional.linear(hidden, head))
        return torch.cat(rows)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # Each row runs alone on its real tokens (padding, left or right, dropped), so a row's logits are
        # bit for bit those it gets without the batch. Only logits: caching and losses are left out (lm-eval
        # needs neither; generation recomputes the prefix each step), and padding positions get zeros.
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = None
        for row in range(input_ids.shape[0]):
            real = mask[row].bool()
            ids = input_ids[row, real].unsqueeze(0)
            row_logits = self.forward_routed(ids, None, self.route(ids))
            if logits is None:
                logits = row_logits.new_zeros((*input_ids.shape, row_logits.shape[-1]))
            logits[row, real] = row_logits[0]
        return CausalLMOutputWithPast(logits=logits)


class TwinFields:
    """What a Twin folder's config adds to its family's, read back by ``RoutedExperts``."""

    twin_num_experts: int = 0
    twin_router_size: int = 0
    twin_ranks: dict | None = None  # tensor name -> the rank kept for each expert
    twin_shapes: dict | None = None  # tensor name -> [rows, cols]
    twin_vector_shapes: dict | None = None  # tensor name -> shape, for tensors kept whole (norms)


class TwinLlamaConfig(TwinFields, LlamaConfig):
    model_type = "evomerge_twin_llama"


class TwinLlamaForCausalLM(RoutedExperts, LlamaForCausalLM):
    config_class = TwinLlamaConfig


class TwinMistralConfig(TwinFields, MistralConfig):
    model_type = "evomerge_twin_mistral"


class TwinMistralForCausalLM(RoutedExperts, MistralForCausalLM):
    config_class = TwinMistralConfig


class TwinQwen2Config(TwinFields, Qwen2Config):
    model_type = "evomerge_twin_qwen2"


class TwinQwen2ForCausalLM(RoutedExperts, Qwen2ForCausalLM):
    config_class = TwinQwen2Config


class TwinQwen3Config(TwinFields, Qwen3Config):
    model_type = "evomerge_twin_qwen3"


class TwinQwen3ForCausalLM(RoutedExperts, Qwen3ForCausalLM):
    config_class = TwinQwen3Config


# Families whose logits are a plain linear head over the final hidden state (Gemma's softcapping and
# scaled embeddings are not reproduced by forward_routed, so Gemma is not offered).
TWIN_MODELS = {
    "llama": TwinLlamaForCausalLM,
    "mistral": TwinMistralForCausalLM,
    "qwen2": TwinQwen2ForCausalLM,
    "qwen3": TwinQwen3ForCausalLM,
}
