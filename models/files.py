"""Reading the project's input files with errors that name the file and what was expected, instead of a parser's
traceback (a truncated safetensors file, a JSON file cut off mid-write, a pickled checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path


def _safetensors(path, what: str, read):
    """``read(path_str)`` of an existing safetensors file, its damage reported as one ValueError naming the file;
    ``what`` says what the file should be."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return read(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}); "
                         "it may be truncated: make it again") from None


def read_tensors(path, what: str) -> dict:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    return _safetensors(path, what, load_file)


def read_header(path, key: str, what: str) -> str | None:
    """The metadata entry ``key`` of a safetensors file (None when absent)."""
    from safetensors import safe_open

    def header(p):
        with safe_open(p, framework="pt") as f:
            return (f.metadata() or {}).get(key)

    return _safetensors(path, what, header)


def read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({err}); it may be truncated: make it "
                         "again") from None


def read_pickled_state_dict(path) -> dict:
    """A ``pytorch_model*.bin`` shard as a plain state dict (``weights_only=True``: unpickling arbitrary objects runs
    their code, so a checkpoint that holds more than tensors is refused with the way out)."""
    import pickle

    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a plain state dict of tensors ({first}). Only tensors are loaded from .bin "
                         "files; re-save it as safetensors or with torch.save(model.state_dict(), ...)") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (a dict of tensors)")
    return sd
