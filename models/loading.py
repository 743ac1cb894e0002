"""Build a decoder: random weights from the registry, or a Hugging Face checkpoint (folder or hub id).

A folder needs ``config.json`` and weights as ``*.safetensors`` (preferred) or ``pytorch_model*.bin``
(read with ``weights_only=True``). A hub id or a registry name is fetched only with ``download=True``;
otherwise only the local Hugging Face cache is used, so nothing downloads by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import DecoderConfig
from .opt import OPTDecoder
from .registry import MODELS, get_spec

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of float16, bfloat16, float32")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, got {dtype!r}")
    return DTYPES[dtype]


def random_model(name_or_cfg, *, dtype="float16", device="cpu", seed: int = 0) -> OPTDecoder:
    cfg = name_or_cfg if isinstance(name_or_cfg, DecoderConfig) else DecoderConfig.from_spec(name_or_cfg)
    return OPTDecoder.random(cfg, parse_dtype(dtype), device, seed)


def _read_state_dict(folder: Path) -> dict:
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        sd = {}
        for shard in shards:
            sd.update(load_file(str(shard)))
        return sd
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for shard in bins:
            sd.update(torch.load(shard, map_location="cpu", weights_only=True))
        return sd
    raise ValueError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")


def _resolve_folder(source: str, download: bool) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source!r} is a file; expected a checkpoint folder, a hub id or one of {list(MODELS)}")
    repo = get_spec(source).hf_id if source in MODELS else source
    if repo is None or "/" not in repo:
        raise ValueError(f"{source!r} is neither a folder, a hub id (owner/name) nor a known model "
                         f"({', '.join(MODELS)})")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=not download))
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        hint = "" if download else " (only the local cache was searched; pass download=True / --download)"
        raise ValueError(f"could not get checkpoint {repo!r}{hint}: {err}") from None


def load_model(source: str, *, dtype="float16", device="cpu", download: bool = False) -> OPTDecoder:
    """Load a Hugging Face OPT checkpoint from a folder, a hub id or a registry name."""
    folder = _resolve_folder(str(source), download)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    hf_cfg = json.loads(config_file.read_text())
    cfg = DecoderConfig.from_hf(hf_cfg, name=Path(str(source)).name)
    sd = _read_state_dict(folder)
    return OPTDecoder.from_hf_state_dict(cfg, sd, parse_dtype(dtype), device)
