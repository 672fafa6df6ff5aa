"""The multimodal half: LLaVA SFT on the real cartoons (Ray Train, CPU), and captions generated with images."""

import json
import shutil

import pandas as pd
import pytest
import torch

from humor_ray.eval import benchmark
from humor_ray.data.prompts import IMAGE_INSTRUCTION
from humor_ray.infer import generate
from humor_ray.models import registry
from humor_ray.models.vision import chat_prompt, check_images, open_image
from humor_ray.train import llava
from humor_ray.train.launcher import TrainError

pytestmark = pytest.mark.timeout(900)
# Contests 530-539 with their cartoons: 536 and 537 are evaluation contests.
REAL_DATASETS = {"summaries": "53[0-9]_*.csv", "datasets": ["llava_sft", "prompts", "references"], "images": True}

SMALL = dict(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
             max_eval_examples=8, max_length=256, max_failures=0, report_to=["none"], learning_rate=1e-3)


@pytest.fixture(scope="module")
def damaged_images(tmp_path_factory, real_data):
    """The cartoons, with 531's missing, 532's cut short, and 571.jpg (really a PNG) standing in for 533's."""
    folder = tmp_path_factory.mktemp("images")
    for contest in range(530, 540):
        shutil.copy(real_data / "images" / f"{contest}.jpg", folder)
    (folder / "531.jpg").unlink()
    data = (folder / "532.jpg").read_bytes()
    (folder / "532.jpg").write_bytes(data[: len(data) // 3])
    shutil.copy(real_data / "images" / "571.jpg", folder / "533.jpg")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets_dir, damaged_images):
    """4 steps of tiny-llava with LoRA, one worker, on cartoons of which two cannot be read."""
    out = tmp_path_factory.mktemp("llava") / "run"
    config = dict(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny-llava", lora_r=8,
                  lora_alpha=16, images=str(damaged_images), **SMALL)
    llava.run(llava.Config(**config))
    return out, config


def test_images_are_checked_by_contest_and_file(damaged_images):
    usable, problems = check_images(str(damaged_images), {530: "530.jpg", 531: "531.jpg", 532: "532.jpg",
                                                          533: "533.jpg", 534: None})
    assert sorted(usable) == [530, 533]
    assert any(p.startswith("contest 531: cannot read image") and "531.jpg" in p for p in problems)
    assert any(p.startswith("contest 532: cannot read image") for p in problems)
    assert any(p.startswith("contest 533: 533.jpg is a PNG file") for p in problems)
    assert "contest 534: no image; left out" in problems
    assert open_image(str(damaged_images), "533.jpg").mode == "RGB"


def test_the_loss_is_on_the_caption_tokens_only(real_data):
    processor = registry.load_processor("tiny-llava")
    collate = llava.ImageConversations(processor, str(real_data / "images"), max_length=256)
    rows = [{"image": "530.jpg", "prompt": "<image>\n" + IMAGE_INSTRUCTION, "caption": "I said a table for two."},
            {"image": "571.jpg", "prompt": "<image>\n" + IMAGE_INSTRUCTION, "caption": "Not again."}]
    batch = collate(rows)
    assert batch["pixel_values"].shape[0] == 2
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        learned = processor.tokenizer.decode(labels[labels != -100])
        assert learned.startswith(row["caption"]) and learned.strip().endswith(processor.tokenizer.eos_token)
        # The prompt (with the cartoon's image tokens) is in the input, never in the loss.
        assert IMAGE_INSTRUCTION in processor.tokenizer.decode(ids)
        assert (ids == image_token).sum() == 16


def test_the_projector_has_its_own_learning_rate_and_the_tower_stays_frozen():
    from peft import get_peft_model

    model, _ = registry.load_model("tiny-llava", kind="image_text")
    cfg = llava.Config(output_dir="unused", dataset_dir="unused", lora_r=4)
    peft_model = get_peft_model(model, llava.peft_config(cfg))
    names = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert names and not any("vision_tower" in n for n in names)
    assert any("lora_" in n and "language_model" in n for n in names)
    groups = llava.projector_param_groups(peft_model, 2e-4, 2e-5, 0.0, set())
    by_lr = {group["lr"]: group["params"] for group in groups}
    projector = {id(p) for n, p in peft_model.named_parameters() if p.requires_grad and "multi_modal_projector" in n}
    assert projector and {id(p) for p in by_lr[2e-5]} == projector
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_llava_trains_reports_unreadable_cartoons_exports_and_resumes(trained, capfd):
    out, config = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert metrics["resumed_from"] is None and "eval_loss" in metrics["eval"]
    assert (out / "final" / "adapter_config.json").is_file() and metrics["model"].endswith("merged")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # The merged model reloads as a vision-language model with its processor, and reads a cartoon.
    model = AutoModelForImageTextToText.from_pretrained(out / "final" / "merged")
    processor = AutoProcessor.from_pretrained(out / "final" / "merged")
    image = open_image(config["images"], "530.jpg")
    inputs = processor(text=[chat_prompt(processor, IMAGE_INSTRUCTION)], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and logits.shape[1] == inputs["input_ids"].shape[1]
    # The projector moved away from the base model's (it trains, fully, beside the LoRA adapter).
    base, _ = registry.load_model("tiny-llava", kind="image_text")
    assert not torch.equal(base.model.multi_modal_projector.linear_1.weight,
                           model.model.multi_modal_projector.linear_1.weight)
    assert torch.equal(base.model.vision_tower.embeddings.patch_embedding.weight,
                       model.model.vision_tower.embeddings.patch_embedding.weight)

    # The same command with more steps continues from the latest checkpoint (step 4).
    llava.run(llava.Config(**{**config, "max_steps": 6}))
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from"] and [e["step"] for e in resumed["log_history"] if "loss" in e] == list(range(1, 7))
    logs = capfd.readouterr()
    text = logs.out + logs.err
    assert "contest 531: cannot read image" in text and "contest 532: cannot read image" in text


def test_a_recipe_whose_rows_cannot_fit_is_refused_before_training(tmp_path, datasets_dir, real_data):
    """Every row's tokens (the cartoon's image tokens, the prompt, the caption) are counted before the cluster
    trains: with room for almost no caption, the run is refused in one line and nothing is trained."""
    out = tmp_path / "refused"
    with pytest.raises(TrainError) as refused:
        llava.run(llava.Config(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny-llava",
                               images=str(real_data / "images"), **{**SMALL, "max_length": 120}))
    assert "\n" not in str(refused.value) and "--max_length 120 fits only" in str(refused.value)
    assert not (out / "ray").exists()


def test_two_workers_under_zero3(tmp_path, datasets_dir, real_data):
    """Also reads each cartoon as one padded view (--image_aspect_ratio pad, as the 7B recipe does)."""
    out = tmp_path / "zero3"
    llava.run(llava.Config(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny-llava",
                           num_workers=2, deepspeed="zero3", images=str(real_data / "images"),
                           image_aspect_ratio="pad", **SMALL))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 2, 3, 4]
    from transformers import AutoModelForImageTextToText

    # Gathered whole from both workers' partitions, in the layout vLLM reads.
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert model.model.language_model.embed_tokens.weight.shape[0] > 1000
    from safetensors import safe_open

    with safe_open(str(out / "final" / "model.safetensors"), "pt") as handle:
        assert any(k.startswith("vision_tower.vision_model.") for k in handle.keys())
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out / "final").image_processor.do_pad


def test_captions_come_from_the_completion_tokens_never_a_character_offset(trained):
    """The original system cut LLaVA's decoded output at len(prompt) characters, which lands inside a word
    whenever decoding does not reproduce the prompt's characters exactly. Ours decodes the new tokens only."""
    from humor_ray.engines import Decoding, HFEngine

    out, config = trained
    engine = HFEngine(str(out / "final" / "merged"))
    prompt = chat_prompt(engine.processor, IMAGE_INSTRUCTION)
    image = open_image(config["images"], "530.jpg")
    samples = engine.generate([prompt], 4, Decoding(max_new_tokens=12, seed=0), images=[image])
    expected_prompt = engine.processor(text=[prompt], images=[image], add_special_tokens=False)["input_ids"][0]
    for sample in samples:
        assert list(sample.prompt_ids) == list(expected_prompt)
        assert sample.text == engine.tokenizer.decode(sample.completion_ids, skip_special_tokens=True)
        caption = generate.clean_caption(sample.text, sample.finished)
        assert IMAGE_INSTRUCTION[-20:] not in sample.text
        if caption and not sample.finished:  # cut by max_new_tokens: only whole words are kept
            assert sample.text.strip().startswith(caption.split()[0]) and caption in sample.text


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_generate_llava_sft_with_the_cartoons(tmp_path, trained, datasets_dir, damaged_images, engine, capfd):
    out, _ = trained
    summary = generate.run(generate.GenerateConfig(
        dataset_dir=str(datasets_dir), output_dir=str(tmp_path / engine), model_name=str(out / "final"),
        method="llava_sft", engine=engine, n=3, max_new_tokens=12, images=str(damaged_images)))
    captions = pd.read_parquet(tmp_path / engine / "captions.parquet")
    assert summary["method"] == "llava_sft" and set(captions["method"]) == {"llava_sft"}
    # 536 and 537 are the evaluation contests; both cartoons are readable.
    assert sorted(captions["contest"].unique()) == [536, 537]
    assert (captions.groupby("contest").size() <= 3).all() and not captions["caption"].str.contains("\n").any()
    assert (tmp_path / engine / "llava_sft.csv").is_file()


def test_a_contest_without_a_readable_cartoon_is_skipped_in_generation(tmp_path, trained, datasets_dir,
                                                                       damaged_images, capfd):
    out, _ = trained
    shutil.copytree(damaged_images, tmp_path / "images")
    (tmp_path / "images" / "537.jpg").write_bytes(b"not an image")
    generate.run(generate.GenerateConfig(
        dataset_dir=str(datasets_dir), output_dir=str(tmp_path / "out"), model_name=str(out / "final"),
        engine="hf", n=2, max_new_tokens=8, images=str(tmp_path / "images")))
    captions = pd.read_parquet(tmp_path / "out" / "captions.parquet")
    assert sorted(captions["contest"].unique()) == [536]
    assert "contest 537: cannot read image" in capfd.readouterr().err


def test_best_of_n_with_a_llava_policy_judged_beside_the_released_llava_captions(tmp_path, trained, datasets_dir,
                                                                                 damaged_images, real_data):
    out, _ = trained
    bon = tmp_path / "bon"
    summary = generate.run_bon(generate.BonConfig(
        dataset_dir=str(datasets_dir), output_dir=str(bon), model_name=str(out / "final"), method="tiny-llava_BoN",
        n=2, candidates_factor=3, max_new_tokens=12, reward_model="builtin:vowel_share", engine="hf",
        images=str(damaged_images)))
    assert summary["candidates"] == 2 * 2 * 3 and summary["mean_reward_kept"] >= summary["mean_reward_all"]
    released = tmp_path / "released"
    released.mkdir()
    for name in ("llava_sft.csv", "llava_zs.csv"):
        shutil.copy(real_data / "benchmarks" / "humor_in_ai_examples" / name, released / name)
    judged = benchmark.run(benchmark.JudgeConfig(
        dataset_dir=str(datasets_dir), generations=[str(bon), str(released)], output_dir=str(tmp_path / "judge"),
        judge="rm", reward_model="builtin:vowel_share", bootstrap=100))
    assert {r["method"] for r in judged["win_rates"]} == {"tiny-llava_BoN", "llava_sft", "llava_zs"}
