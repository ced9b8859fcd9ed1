"""Where a model's files are: a local folder, or a Hugging Face Hub ID resolved to a cached snapshot.

A model is named by a folder or by ``org/name`` / ``org/name@revision``. A folder that exists always
wins, so a local copy shadows the Hub. An ID goes through ``huggingface_hub.snapshot_download``, which
brings its cache, token and offline mode (``HF_HUB_OFFLINE``) with it, and resolves to a commit. The
commit is what a run records (``ResolvedModel.pinned``): ``org/name`` moves when its owner pushes,
``org/name@<commit>`` does not, so a resume or a re-export reads the weights the search scored.

Only the files a merge reads are fetched: config, generation config, tokenizer, and one set of
weights in transformers' order of preference (safetensors index, ``model.safetensors``, ``.bin``
index, ``pytorch_model.bin``). Repositories often carry a second copy of the weights (``.bin`` beside
safetensors, Mistral's ``consolidated.safetensors``), which a ``*.safetensors`` pattern would fetch too.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Everything but the weights: what ``write_model_files`` copies and what transformers reads beside them.
_METADATA = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "vocab*",
    "merges.txt",
    "chat_template*",
    SAFETENSORS_INDEX,
    BIN_INDEX,
    SAFETENSORS_SINGLE,  # fetched with the metadata: when present it is the whole model
]
# ``org/name`` or ``org/name@revision``, as the Hub spells repository IDs (no '--' or '..' inside).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>\S+))?")


@dataclass(frozen=True)
class ResolvedModel:
    """A model as evomerge reads it: a local folder, and where it came from when it came from the Hub."""

    path: Path
    ref: str
    repo_id: str | None = None
    commit: str | None = None

    @property
    def pinned(self) -> str:
        """The reference to record: ``org/name@<commit>`` for a Hub model (the same weights on every
        later resolution), else the folder as it was given."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id is not None else self.ref


def resolve_model(ref: str | Path) -> ResolvedModel:
    """The local folder (and, for a Hub ID, the commit) that ``ref`` names; every failure is an ``EvomergeError``.

    Resolutions are kept for the life of the process: every part of a run that opens ``org/name``
    then reads one commit, even if the owner pushes mid-run.
    """
    text = str(ref)
    folder = Path(text).expanduser()
    match = _HUB_ID.fullmatch(text)
    if folder.is_dir() or match is None or "--" in text or ".." in text:
        return ResolvedModel(path=folder, ref=text)
    from huggingface_hub import constants

    return _from_hub(match["repo"], match["revision"], text, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)


@functools.cache
def _from_hub(repo_id: str, revision: str | None, ref: str, cache: str, offline: bool) -> ResolvedModel:
    # ``cache`` and ``offline`` only key the memo (a test or a caller may switch them); huggingface_hub
    # reads both itself. Errors are imported from ``utils``, where every release since 0.2x exports them.
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # local_files_only when offline: huggingface_hub 1.x, given a commit hash, would otherwise ask the
        # Hub for the file list and raise OfflineModeIsEnabled instead of reading the cache.
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_METADATA, local_files_only=offline))
        weights = _weight_files(folder)
        # The commit (the snapshot folder's name) pins the second call to the snapshot the first one read.
        snapshot_download(repo_id, revision=folder.name, allow_patterns=weights, local_files_only=offline)
    except LocalEntryNotFoundError as error:  # offline or unreachable, and not (completely) in the cache
        raise _not_cached(ref, repo_id, revision, cache, offline) from error
    except GatedRepoError as error:
        raise EvomergeError(
            f"'{repo_id}' is a gated model on the Hugging Face Hub and this machine has no access to it",
            f"accept its terms on https://huggingface.co/{repo_id}, then log in with `hf auth login` (or set HF_TOKEN)",
        ) from error
    except RepositoryNotFoundError as error:
        raise EvomergeError(
            f"'{ref}' is neither a folder here nor a model on the Hugging Face Hub (or the model is private)",
            "check the path or the ID; for a private model log in with `hf auth login` (or set HF_TOKEN)",
        ) from error
    except RevisionNotFoundError as error:
        raise EvomergeError(
            f"model '{repo_id}' has no revision '{revision}' on the Hugging Face Hub",
            "use a branch, tag or commit hash that exists (the model page's 'Files and versions' lists them)",
        ) from error
    except HfHubHTTPError as error:
        raise EvomergeError(
            f"the Hugging Face Hub refused '{ref}' ({str(error).splitlines()[0]})",
            "check the ID and your token, or try again later",
        ) from error
    missing = [name for name in ["config.json", *weights] if not (folder / name).is_file()]
    if missing:
        raise _incomplete(repo_id, folder.name, missing, cache, offline)
    return ResolvedModel(path=folder, ref=ref, repo_id=repo_id, commit=folder.name)


def _weight_files(folder: Path) -> list[str]:
    """The weight files transformers would read, by its order of preference, judged from the metadata
    already in ``folder``: a ``pytorch_model.bin`` is fetched only when nothing else is there."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index).is_file():
            try:
                return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError):
                return [index]  # present, so nothing is missing: Checkpoint.open names what is wrong with it
        if index == SAFETENSORS_INDEX and (folder / SAFETENSORS_SINGLE).is_file():
            return [SAFETENSORS_SINGLE]
    return [BIN_SINGLE]


def _download(repo_id: str, revision: str | None) -> str:
    command = f"{repo_id} --revision {revision}" if revision else repo_id
    return (
        f"download it where there is network with `hf download {command}` (`huggingface-cli download {command}` "
        "on an older huggingface_hub) into that cache"
    )


def _not_cached(ref: str, repo_id: str, revision: str | None, cache: str, offline: bool) -> EvomergeError:
    at = f" at revision '{revision}'" if revision else ""
    problem = f"'{ref}' is not a folder here, nor in the Hugging Face cache ({cache}) as model '{repo_id}'{at}"
    if offline:
        return EvomergeError(
            f"{problem}, and offline mode (HF_HUB_OFFLINE) forbids downloading it",
            f"{_download(repo_id, revision)}, or unset HF_HUB_OFFLINE; if you meant a local folder, check the path",
        )
    return EvomergeError(
        f"{problem}, and the Hugging Face Hub could not be reached to download it",
        f"check this machine's connection to the Hub, or {_download(repo_id, revision)}; "
        "if you meant a local folder, check the path",
    )


def _incomplete(repo_id: str, commit: str, missing: list[str], cache: str, offline: bool) -> EvomergeError:
    if offline:
        return EvomergeError(
            f"the Hugging Face cache ({cache}) holds model '{repo_id}' at commit {commit} without "
            f"{', '.join(missing)}, and offline mode (HF_HUB_OFFLINE) forbids downloading it",
            f"{_download(repo_id, commit)}, or unset HF_HUB_OFFLINE",
        )
    return EvomergeError(
        f"model '{repo_id}' at commit {commit} has no {', '.join(missing)} (or the Hub could not be reached): "
        "evomerge reads a config.json with model.safetensors or pytorch_model.bin weights (sharded or not)",
        "pick a repository in transformers' format (GGUF-only, adapter-only or original-format repositories "
        "cannot be merged), or check this machine's connection to the Hub",
    )
