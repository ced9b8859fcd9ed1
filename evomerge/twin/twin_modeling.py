"""evomerge Twin model: shared weights plus exclusive low-rank parts weighted per input by a router.

evomerge copies this file into an exported Twin-Merging model (Lu et al. 2024, arXiv:2406.15479).
Load such a folder with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

For each input row, the shared model reads the row once and a small MLP maps its mean-pooled final
hidden state (over the row's real tokens) to softmax weights w over the experts. The row is then run,
batched with the others, with every targeted matrix W acting as ``W x + sum_i w_i * U_i (V_i x)``: the
experts' low-rank parts run beside the shared weights as adapters and are never added into a dense
copy. Every other routed tensor (norm weights, biases) is ``shared + sum_i w_i * D_i`` for that row, D_i
the whole difference (a few numbers per layer). A row's weights are read once, from its prompt, and
hold for the whole sequence: generation decodes through the KV cache with them, and without a cache
gives the same tokens. The weights cannot be folded into a static checkpoint: they change with the input.
Each family's model type is evomerge's own, so that loading without ``trust_remote_code`` fails instead
of silently running the shared model alone. Needs only torch and transformers (written against 5.25).
"""

from functools import partial

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


def factor_key(name: str, part: str) -> str:
    """The parameter name of tensor ``name``'s part: "u" (rows x sum of ranks) and "v" (sum of ranks x
    columns), every expert's factors side by side in expert order, or "d" (experts x shape), the differences."""
    return f"{name.replace('.', '__')}__{part}"


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
    real = attention_mask.bool().unsqueeze(-1)
    # masked_fill, not a product with the mask: a fully masked padding position may hold NaN.
    return hidden.masked_fill(~real, 0).sum(dim=1) / real.sum(dim=1).clamp(min=1).to(hidden.dtype)


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens: a left-padded row reads as it does alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (batch x n) shaped to broadcast over ``like`` (batch x ... x n)."""
    return values.view(values.shape[0], *[1] * (like.dim() - 2), values.shape[1])


class RoutedExperts:
    """Mixed in before a family's ``...ForCausalLM``: adds the factors and the router, and routes each row."""

    _keep_in_fp32_modules_strict = ["twin_factors"]  # low-rank products in float32 whatever the model's dtype

    def __init__(self, config) -> None:
        super().__init__(config)
        self.twin_router = TwinRouter(
            hidden_size=config.hidden_size, router_size=config.twin_router_size, num_experts=config.twin_num_experts
        )
        shapes = {}
        for name, ranks in config.twin_ranks.items():
            rows, cols = config.twin_shapes[name]
            shapes[factor_key(name, "u")] = (rows, sum(ranks))
            shapes[factor_key(name, "v")] = (sum(ranks), cols)
        for name, shape in (config.twin_vector_shapes or {}).items():
            shapes[factor_key(name, "d")] = (config.twin_num_experts, *shape)
        self.twin_factors = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(shape), requires_grad=False) for key, shape in shapes.items()}
        )
        # Set only while a routed forward runs (None: the shared model alone, as the router reads it).
        self._twin_weights = None  # batch x experts
        self._twin_columns = None  # ranks -> batch x sum(ranks): each factor column's weight, per row
        self._twin_prompt = None  # the prompt's weights, held by generate()
        self._attach_adapters()

    def _attach_adapters(self) -> None:
        modules = dict(self.named_modules())
        for name, ranks in self.config.twin_ranks.items():
            if sum(ranks) == 0:
                continue
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, nn.Embedding):
                owner.register_forward_hook(partial(self._embedding_adapter, name))
                if self.config.tie_word_embeddings and owner is self.get_input_embeddings():
                    # The head is this matrix: W h + U (V h) with the embedding's factors.
                    self.get_output_embeddings().register_forward_hook(partial(self._low_rank_adapter, name))
            else:
                owner.register_forward_hook(partial(self._low_rank_adapter, name))
        for name in self.config.twin_vector_shapes or {}:
            owner_name, _, kind = name.rpartition(".")
            owner = modules[owner_name]
            adapter = self._bias_adapter if kind == "bias" else self._weight_vector_adapter
            owner.register_forward_hook(partial(adapter, name))

    def _low_rank_adapter(self, name, module, args, output):
        if self._twin_columns is None:
            return output
        x, u, v = args[0], self.twin_factors[factor_key(name, "u")], self.twin_factors[factor_key(name, "v")]
        low = x.to(v.dtype) @ v.T * _per_row(self._twin_columns[tuple(self.config.twin_ranks[name])], x)
        return output + (low @ u.T).to(output.dtype)

    def _embedding_adapter(self, name, module, args, output):
        if self._twin_columns is None:
            return output
        ids, u, v = args[0], self.twin_factors[factor_key(name, "u")], self.twin_factors[factor_key(name, "v")]
        rows = u[ids] * _per_row(self._twin_columns[tuple(self.config.twin_ranks[name])], ids.unsqueeze(-1))
        return output + (rows @ v).to(output.dtype)

    def _bias_adapter(self, name, module, args, output):
        if self._twin_weights is None:
            return output
        delta = self._twin_weights @ self.twin_factors[factor_key(name, "d")]
        return output + _per_row(delta, output).to(output.dtype)

    def _weight_vector_adapter(self, name, module, args, output):
        # A norm's weight, per row: the module runs again on the routed weight (norms are cheap), as the
        # family's own code computes it; the adapters are off meanwhile, or this hook would call itself.
        if self._twin_weights is None:
            return output
        shared = getattr(module, name.rpartition(".")[2])
        routed = shared + (self._twin_weights @ self.twin_factors[factor_key(name, "d")]).to(shared.dtype)
        weights, columns = self._twin_weights, self._twin_columns
        self._twin_weights = self._twin_columns = None
        try:
            return functional_call(module, {name.rpartition(".")[2]: _per_row(routed, args[0])}, args)
        finally:
            self._twin_weights, self._twin_columns = weights, columns

    def route(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each row's weights over the experts, read from the shared model's pooled hidden state."""
        if position_ids is None and attention_mask is not None:
            position_ids = real_positions(attention_mask)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return torch.softmax(self.twin_router(pooled_hidden(hidden, attention_mask)).float(), dim=-1)

    def forward_routed(self, input_ids, attention_mask, weights: torch.Tensor, **kwargs):
        """The family's forward (``kwargs`` passed on), each row run with its own row of ``weights`` (batch x experts)."""
        weights = weights.to(device=input_ids.device, dtype=torch.float32)
        columns = {}
        for ranks in map(tuple, self.config.twin_ranks.values()):
            if ranks not in columns:
                repeats = torch.tensor(ranks, device=weights.device)
                columns[ranks] = weights.repeat_interleave(repeats, dim=1, output_size=sum(ranks))
        self._twin_weights, self._twin_columns = weights, columns
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._twin_weights = self._twin_columns = None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0, **kwargs):
        fresh = cache is None or cache.get_seq_length() == 0
        if position_ids is None and fresh and attention_mask is not None:
            position_ids = real_positions(attention_mask)
        if self._twin_prompt is not None:  # generate(): rows may be repeated (beams, several sequences)
            weights = self._twin_prompt.repeat_interleave(input_ids.shape[0] // self._twin_prompt.shape[0], dim=0)
        elif not fresh:
            weights = cache.twin_weights  # set when the cache was filled from the prompt
        else:
            weights = self.route(input_ids, attention_mask, position_ids)
        out = self.forward_routed(
            input_ids,
            attention_mask,
            weights,
            position_ids=position_ids,
            cache=cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if out.cache is not None:
            out.cache.twin_weights = weights
        return out

    def generate(self, inputs=None, **kwargs):
        # The weights are read from the prompt once and held for every new token, with or without a cache
        # (without one, each step would otherwise route again on the prompt and the tokens made so far).
        prompt = inputs if inputs is not None else kwargs["input_ids"]
        with torch.no_grad():
            self._twin_prompt = self.route(prompt, kwargs.get("attention_mask"))
        try:
            return super().generate(inputs, **kwargs)
        finally:
            self._twin_prompt = None


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


# Families whose layers are plain Linear, Embedding and RMSNorm modules that the adapters above hook
# (Gemma's (1 + w) norms, scaled embeddings and softcapping are not handled, so Gemma is not offered).
TWIN_MODELS = {
    "llama": TwinLlamaForCausalLM,
    "mistral": TwinMistralForCausalLM,
    "qwen2": TwinQwen2ForCausalLM,
    "qwen3": TwinQwen3ForCausalLM,
}
