"""A word-level tokenizer over both languages, trained locally and wrapped for transformers."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from evomerge.toy.language import L1_WORDS, L2_WORDS, NUMERALS, SPECIAL_TOKENS


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a WordLevel tokenizer on one sentence listing every word, so ids follow a fixed order.

    The post-processor prepends <bos>: lm-eval's loglikelihood encodes context and continuation with the
    tokenizer's defaults, so the models must see the same <bos> in training as lm-eval gives them.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    words = list(L1_WORDS) + list(L2_WORDS) + list(NUMERALS)
    # WordLevelTrainer orders words by frequency, then alphabetically; equal counts keep the order fixed.
    tokenizer.train_from_iterator([" ".join(words)], trainer=trainer)
    bos_id = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
