"""A recipe's ``tokenizer_source``: one output vocabulary, and every source's embedding and head rows
moved to it by token text, as mergekit 0.1.5 does (``mergekit/tokenizer/build.py`` and ``embed.py``).

``base`` keeps the base's tokenizer (the first model's where the method takes no base), ``union`` adds
every model's tokens to it, a model's path keeps that model's. A token a source lacks is given, in that
source only, the row mergekit's ``PermutedVocabulary.assign_embedding_sources`` picks: the row of the
one source that has it; else the base's, where the base is merged and has it; else the mean of the
rows of the sources that have it; zeros where none has it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.locate import resolve_model

if TYPE_CHECKING:  # transformers is imported when a vocabulary is built, not with this module
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class OutputVocabulary:
    """The output tokenizer, and for each source (base first) the source row of every output token."""

    tokenizer: PreTrainedTokenizerBase
    folder: Path | None  # a source's folder whose tokenizer files are the output's, copied verbatim
    rows: tuple[torch.Tensor, ...]  # per source: (size,) row index in that source, -1 where it lacks the token
    lacking: torch.Tensor  # output ids some source lacks
    donors: torch.Tensor  # (len(lacking), sources) bool: whose rows make the row given where it is lacking

    @property
    def size(self) -> int:
        return self.rows[0].numel()

    @classmethod
    def build(
        cls, source: str, *, checkpoints: Sequence[Checkpoint], rows_in: Sequence[int], has_base: bool
    ) -> OutputVocabulary:
        """``checkpoints``: the merge's sources, the base first where ``has_base``; ``rows_in``: how many
        embedding rows each has."""
        from transformers import AutoTokenizer

        tokenizers = [AutoTokenizer.from_pretrained(c.path) for c in checkpoints]
        vocabs = [_usable(t.get_vocab(), n) for t, n in zip(tokenizers, rows_in, strict=True)]
        # mergekit strips the base tokenizer to its embedding (BPE only) and fails on tokens past the end
        # elsewhere; a tokenizer larger than its model is a broken checkpoint, refused here instead.
        if len(vocabs[0]) != len(tokenizers[0].get_vocab()):
            raise EvomergeError(
                f"the tokenizer of '{checkpoints[0].ref}' has tokens with ids past its {rows_in[0]} embedding rows",
                "resize that model's embeddings to its tokenizer (model.resize_token_embeddings(len(tokenizer)), "
                "then save_pretrained) before merging it",
            )
        if source == "base":
            tokenizer, folder = tokenizers[0], checkpoints[0].path
        elif source == "union":
            tokenizer, folder = _union(checkpoints[0].path, tokenizers, rows_in), None
        else:
            named = _named(source, checkpoints)
            tokenizer, folder = tokenizers[named], checkpoints[named].path
        out = tokenizer.get_vocab()
        if sorted(out.values()) != list(range(len(out))):
            raise EvomergeError(
                f"the output tokenizer (tokenizer_source '{source}') numbers its {len(out)} tokens with gaps",
                "use a tokenizer whose ids run from 0 without gaps as tokenizer_source",
            )
        rows = tuple(_rows(out, vocab) for vocab in vocabs)
        present = torch.stack(rows, dim=1) >= 0
        lacking = (~present.all(dim=1)).nonzero().flatten()
        return cls(
            tokenizer=tokenizer,
            folder=folder,
            rows=rows,
            lacking=lacking,
            donors=_donors(present[lacking], has_base=has_base),
        )

    def remap(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each source's rows (``tensors``, in source order, vocabulary first) in the output vocabulary."""
        rest = tensors[0].shape[1:]
        # Summed in source order then divided, as mergekit averages; one donor gives its row exactly.
        given = tensors[0].new_zeros((self.lacking.numel(), *rest))
        for tensor, rows, donor in zip(tensors, self.rows, self.donors.T, strict=True):
            given[donor] += tensor[rows[self.lacking[donor]]]
        given /= self.donors.sum(dim=1).clamp(min=1).to(given.dtype).view(-1, *[1] * len(rest))
        out = []
        for tensor, rows in zip(tensors, self.rows, strict=True):
            remapped = tensor.new_empty((self.size, *rest))
            have = rows >= 0
            remapped[have] = tensor[rows[have]]
            missing = rows[self.lacking] < 0
            remapped[self.lacking[missing]] = given[missing]
            out.append(remapped)
        return out

    def save_tokenizer(self, folder: Path) -> Path:
        """The folder whose tokenizer files the output copies: the source's, or ``folder`` with the built one."""
        if self.folder is not None:
            return self.folder
        self.tokenizer.save_pretrained(folder)
        return folder


def _usable(vocab: dict[str, int], rows: int) -> dict[str, int]:
    """A source's tokens that have a row (mergekit skips the others, with a warning)."""
    return {token: i for token, i in vocab.items() if i < rows}


def _rows(out: dict[str, int], vocab: dict[str, int]) -> torch.Tensor:
    rows = torch.full((len(out),), -1, dtype=torch.long)
    for token, i in out.items():
        rows[i] = vocab.get(token, -1)
    return rows


def _donors(present: torch.Tensor, *, has_base: bool) -> torch.Tensor:
    """mergekit's ``assign_embedding_sources`` for tokens some source lacks (``present``: token x source)."""
    count = present.sum(dim=1)
    donors = present.clone()  # one holder: its row; several: their mean; none: zeros
    if has_base:
        by_base = (count > 1) & present[:, 0]
        donors[by_base] = False
        donors[by_base, 0] = True
    return donors


def _named(source: str, checkpoints: Sequence[Checkpoint]) -> int:
    wanted = os.path.realpath(resolve_model(source).path)
    for i, checkpoint in enumerate(checkpoints):
        if os.path.realpath(checkpoint.path) == wanted:
            return i
    raise EvomergeError(
        f"tokenizer_source '{source}' is neither 'base', 'union' nor one of the models this merge reads "
        f"({', '.join(c.ref for c in checkpoints)}), so no embedding rows exist for its tokens",
        "set tokenizer_source to 'base', 'union' or the path of one of those models as the recipe writes it",
    )


def _union(
    base: Path, tokenizers: Sequence[PreTrainedTokenizerBase], rows_in: Sequence[int]
) -> PreTrainedTokenizerBase:
    """mergekit's ``build_union_tokenizer``: the base's tokenizer, then every other token each source has
    a row for, as a plain added token in order of first appearance, then the added (special) tokens.

    mergekit reads sources in set order and vocabularies in hash order, so its new ids may come in
    another order; here they come in source order, then id order. Rows follow tokens, never ids.
    """
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tokenizer, rows in zip(tokenizers, rows_in, strict=True):
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if i < rows:
                plain.setdefault(token)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i < rows:
                added.setdefault(info.content, info)
    out = AutoTokenizer.from_pretrained(base)  # a fresh copy: the base's tokenizer object stays as read
    known = out.get_vocab()
    for token in plain:
        if token not in added and token not in known:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out
