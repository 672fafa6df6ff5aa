"""How many tokens a LLaVA training row takes (the cartoon's image tokens, the prompt, the caption), counted with
the model's processor before training; rows that cannot fit are left out, a recipe where most cannot is refused.
The paper's 7B recipe is checked with llava-v1.6-mistral's processor settings, built here from config."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from humor_ray.config import data_root
from humor_ray.data.prompts import IMAGE_INSTRUCTION
from humor_ray.models import registry
from humor_ray.models.vision import load_single_view, open_image, single_view_processor, write_vllm_layout
from humor_ray.train import llava
from humor_ray.train.launcher import TrainError

IMAGES = str(data_root() / "images")
PROMPT = "<image>\n" + IMAGE_INSTRUCTION
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def rows(*pairs):
    """A llava_sft table of (contest, caption) rows, each contest with its own cartoon."""
    return {"contest": [c for c, _ in pairs], "image": [f"{c}.jpg" for c, _ in pairs],
            "prompt": [PROMPT] * len(pairs), "caption": [t for _, t in pairs]}


def test_the_count_is_what_the_collator_builds():
    processor = registry.load_processor("tiny-llava")
    table = rows((530, "I said a table for two."), (571, "Not again, " * 30))
    counts = llava.tokens_per_row(processor, IMAGES, table["image"], table["prompt"], table["caption"])
    batch = llava.ImageConversations(processor, IMAGES, max_length=4096)(
        [dict(zip(table, values)) for values in zip(*table.values())])
    assert counts == batch["attention_mask"].sum(dim=1).tolist()
    assert counts[1] > counts[0]


def test_a_row_that_cannot_fit_is_reported_by_contest_and_left_out(capsys):
    processor = registry.load_processor("tiny-llava")
    table = rows((530, "Short."), (530, "Also short."), (531, "Short too."), (531, "Much too long, " * 20))
    short, long_ = llava.tokens_per_row(processor, IMAGES, table["image"][2:], table["prompt"][2:],
                                        table["caption"][2:])
    fits = llava.fitting_rows(processor, IMAGES, table, max_length=short + 4, split="train")
    assert fits == [True, True, True, False]
    err = capsys.readouterr().err
    assert f"train: contest 531: 1 row(s) need {long_:,} tokens, more than --max_length {short + 4}" in err
    assert "contest 530" not in err
    # The driver drops those rows, by contest and caption, before Ray Data splits the rest among the workers.
    skip = llava.SkipRows(set(), {("531", table["caption"][3])})
    assert [skip(dict(zip(table, values))) for values in zip(*table.values())] == fits


def test_a_recipe_where_most_rows_cannot_fit_is_refused_in_one_line():
    processor = registry.load_processor("tiny-llava")
    table = rows((530, "Short."), (531, "Far too long for it, " * 20), (532, "Also far too long, " * 20))
    with pytest.raises(TrainError) as refused:
        llava.fitting_rows(processor, IMAGES, table, max_length=200, split="train")
    message = str(refused.value)
    assert "\n" not in message and "--max_length 200 fits only 1 of 3 train rows" in message
    assert "--image_aspect_ratio pad" in message


@pytest.fixture(scope="module")
def llava_next_processor():
    """llava-hf/llava-v1.6-mistral-7b-hf's processor settings (any-resolution tiles of 336 px, patch 14, the CLS
    token dropped), on the tiny preset's tokenizer with its <image> token: no download."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tiny = registry.load_processor("tiny-llava")
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaNextProcessor(image_processor=images, tokenizer=tiny.tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=tiny.chat_template, image_token="<image>")


def image_tokens(processor, image):
    return len(processor(images=[image], text=["<image>"])["input_ids"][0])


def test_the_7b_recipe_reads_each_cartoon_as_one_576_token_view_that_fits(llava_next_processor):
    recipe = yaml.safe_load((JOBS / "llava-7b.yaml").read_text())
    assert recipe["image_aspect_ratio"] == "pad"
    padded = single_view_processor(llava_next_processor)
    names = sorted(os.listdir(IMAGES))
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes and resizes outside the GIL: every core
        cartoons = list(pool.map(lambda name: open_image(IMAGES, name), names))
        native = dict(zip(names, pool.map(lambda image: image_tokens(llava_next_processor, image), cartoons)))
        single_view = set(pool.map(lambda image: image_tokens(padded, image), cartoons))
    # LLaVA-NeXT's own processor tiles the cartoons: most of them alone overflow 2,048 tokens.
    assert (min(native.values()), max(native.values())) == (1272, 2928)
    assert sum(n > 2048 for n in native.values()) == 173 and len(native) == 186
    # The recipe's padded single view: 576 tokens for every cartoon.
    assert single_view == {576}
    # Then a row fits, even with the widest cartoons and a long caption.
    widest = sorted(native, key=native.get)[-3:]
    table = rows(*((int(Path(name).stem), "Well, it was the last table by the window, " * 3) for name in widest))
    table["image"] = widest
    assert all(llava.fitting_rows(padded, IMAGES, table, recipe["max_length"], "train"))


def test_a_llava_next_checkpoint_trains_and_saves_as_one_view_llava(tmp_path, llava_next_processor):
    from transformers import (AutoConfig, AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration)

    tokenizer = llava_next_processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, vocab_size=len(tokenizer))
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=llava_next_processor.image_processor.image_grid_pinpoints)
    torch.manual_seed(0)
    next_model = LlavaNextForConditionalGeneration(config)
    next_model.save_pretrained(tmp_path / "next")
    llava_next_processor.save_pretrained(tmp_path / "next")

    model, processor = load_single_view(str(tmp_path / "next"))
    assert isinstance(model, LlavaForConditionalGeneration)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight,
                       next_model.model.multi_modal_projector.linear_1.weight)
    inputs = processor(text=["<image>\nA caption."], images=[open_image(IMAGES, "530.jpg")], return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_index).sum() == 576
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()

    # A LoRA adapter merged onto the NeXT base is saved beside the one-view processor: it becomes that LLaVA.
    next_model.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    write_vllm_layout(tmp_path / "merged")
    assert AutoConfig.from_pretrained(tmp_path / "merged").model_type == "llava"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert isinstance(reloaded, LlavaForConditionalGeneration)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model(**inputs).logits)
