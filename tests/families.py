"""Tiny configs of every model family evomerge merges, shared by the PS and data-flow architecture tests.

Llama 3.x: grouped-query attention and the llama3 rope scaling; 3.1 8B is untied, 3.2 1B and 3B tied.
Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k norms; tied at 0.6B-4B) with a sliding window; Gemma
ties and offsets its norms (1 + w) and soft-caps; Phi-3 fuses qkv_proj and gate_up_proj.
"""

from __future__ import annotations

WINDOW = 4  # short enough that a 9-token prompt sees sliding and full attention differ
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # greedy generation runs its full length
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, final_logit_softcapping=5.0)
# Family -> (model_type, config keys beside SIZES).
FAMILIES = {
    "llama": ("llama", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("mistral", dict(sliding_window=WINDOW)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW)),
    "qwen3": ("qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW)),
    "gemma2": ("gemma2", dict(GEMMA, attn_logit_softcapping=20.0)),
    "gemma3_text": ("gemma3_text", GEMMA),
    "phi3": ("phi3", dict(tie_word_embeddings=False)),
}
