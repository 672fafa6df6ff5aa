"""The training stages on Ray Train (local Ray, CPU), on real SFT data and real preference pairs."""

import json
import os
import signal
import threading
import time

import pyarrow.fs as pafs
import pytest

from conftest import REWARD_MODEL_RUN, our_processes, registered_checkpoints, scratch_folders
from conftest import SMALL_TRAINING as SMALL

from humor_ray.models.reward_inputs import encode
from humor_ray.train import dpo, rm, sft

pytestmark = pytest.mark.timeout(900)
# 530 is a training contest, 536 an evaluation one; prompts: for a best-of-N pool on the training split.
REAL_DATASETS = {"summaries": "53[06]_LilUCB.csv", "datasets": ["sft_simple", "pairs", "prompts"]}

def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def actors_started(class_name: str) -> int:
    """How many actors of the class the session's cluster has started, ended ones too."""
    import ray
    from ray.util.state import list_actors

    found = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False,
                        filters=[("class_name", "=", class_name)])
    return len(found)


def placement_groups_held() -> int:
    """Placement groups of the session's cluster that still hold (or wait for) resources."""
    import ray

    return sum(group["state"] != "REMOVED" for group in ray.util.placement_group_table().values())


def steps_logged(metrics, key="loss"):
    return [entry["step"] for entry in metrics["log_history"] if key in entry]


def test_sft_trains_checkpoints_exports_and_resumes_on_rerun(tmp_path, datasets_dir):
    out = tmp_path / "sft"
    config = dict(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny", simple_prompt=True,
                  lora_r=8, lora_alpha=16, **{**SMALL, "report_to": ["tensorboard"]})
    scratch_before = scratch_folders()
    managers_before, cleaners_before = actors_started("DatasetManager"), actors_started("PlacementGroupCleaner")
    groups_before = placement_groups_held()
    sft.run(sft.Config(**config))
    # The workers read this small split themselves: the run started no Ray Data actor for it, nor Ray Train's
    # placement-group cleaner (train/ray_trainer.py); the run removed its placement group itself.
    assert actors_started("DatasetManager") == managers_before
    assert actors_started("PlacementGroupCleaner") == cleaners_before
    assert placement_groups_held() == groups_before
    assert len(list((out / "ray" / "sft").glob("checkpoint_*/checkpoint"))) == 2
    first = metrics_of(out)
    assert steps_logged(first) == [1, 2, 3, 4] and first["resumed_from"] is None
    assert "eval_loss" in first["eval"] and first["eval"]["eval_num_tokens"] > 0
    assert any("train_tokens_per_second" in entry for entry in first["log_history"])
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    # LoRA: the adapter in final/, the merged model (what vLLM serves) in final/merged.
    assert (out / "final" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
    assert merged.config.num_hidden_layers == 2 and not hasattr(merged, "peft_config")

    # The same command with more steps continues from the latest checkpoint (step 4), not from zero.
    sft.run(sft.Config(**{**config, "max_steps": 6}))
    second = metrics_of(out)
    assert second["resumed_from"]
    assert steps_logged(second) == [1, 2, 3, 4, 5, 6]
    # The workers' scratch (the trainer's checkpoints, the one restored to resume) went with them.
    assert scratch_folders() <= scratch_before


def test_reward_model_reports_pairwise_accuracy(reward_model_run):
    out = reward_model_run  # the session's run (conftest.REWARD_MODEL_RUN), which test_rl's PPO scores with
    metrics = metrics_of(out)
    evaluations = [entry for entry in metrics["log_history"] if "eval_accuracy" in entry]
    assert sorted({entry["step"] for entry in evaluations}) == [2, 4]  # at every evaluation
    assert 0.0 <= metrics["eval"]["eval_accuracy"] <= 1.0  # and at the end
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 1


def test_a_fold_reward_model_trains_only_on_its_folds_contests(tmp_path, datasets_dir, monkeypatch):
    """--contest_fold K/N: the workers hold rows of the fold's contests alone, and metrics.json says which
    contests and the accuracy on the held-out pairs (the same pairs whatever the fold)."""
    import shutil

    import pandas as pd

    from humor_ray.data.folds import contest_fold
    from humor_ray.models import registry

    # A training split of two contests: the module's own, and the held-out one's pairs copied in beside it.
    data = tmp_path / "datasets"
    shutil.copytree(datasets_dir, data)
    for part in (data / "pairs" / "eval").glob("*.parquet"):
        shutil.copyfile(part, data / "pairs" / "train" / f"extra-{part.name}")
    pairs = pd.read_parquet(data / "pairs" / "train")
    ours, other = sorted(set(pairs["contest"]))
    folds = next(n for n in range(2, 20) if contest_fold(ours, n) != contest_fold(other, n))
    record = tmp_path / "rows"
    monkeypatch.setenv("HUMOR_RAY_RECORD_TRAIN_ROWS", str(record))
    out = tmp_path / "rm"
    rm.run(rm.Config(output_dir=str(out), dataset_dir=str(data), contest_fold=f"{contest_fold(ours, folds)}/{folds}",
                     **{**REWARD_MODEL_RUN, "max_steps": 2}))
    tokenizer = registry.load_tokenizer("minilm")

    def inputs(contest):
        rows = pairs[pairs["contest"] == contest]
        encoded = encode(tokenizer, list(rows["prompt"]), list(rows["chosen"]), SMALL["max_length"])
        return {tuple(ids) for ids in encoded}

    held = [tuple(json.loads(line)["chosen_ids"]) for line in (record / "rank0-rows.jsonl").read_text().splitlines()]
    assert held and set(held) <= inputs(ours) and not set(held) & inputs(other)
    metrics = metrics_of(out)
    assert metrics["train_contests"] == [ours] and metrics["contest_fold"] == f"{contest_fold(ours, folds)}/{folds}"
    assert metrics["held_out"] == {"accuracy": metrics["eval"]["eval_accuracy"], "split": "eval",
                                   "pairs": SMALL["max_eval_examples"], "seed": 2024}
    assert 0.0 <= metrics["held_out"]["accuracy"] <= 1.0
    # A split too large for the workers to read themselves streams through Ray Data, filtered the same way.
    from humor_ray.train.launcher import stream_split

    config = rm.Config(output_dir=str(out), dataset_dir=str(data), contest_fold=metrics["contest_fold"])
    streamed = stream_split(config, rm.STAGE).to_pandas()
    assert len(streamed) == (pairs["contest"] == ours).sum()
    assert set(streamed["prompt"]) == set(pairs[pairs["contest"] == ours]["prompt"])


def test_reward_input_keeps_the_caption_and_the_end_of_a_long_prompt():
    from humor_ray.models import registry

    prompt = "scene: an office\n" + "description: " + "a very long description " * 100 + "\nfunny caption:"
    for spec in ("minilm", "tiny"):
        tokenizer = registry.load_tokenizer(spec)
        (ids,) = encode(tokenizer, [prompt], ["I said the quarterly report, not the quarterly rapport."], 64)
        text = tokenizer.decode(ids)
        assert len(ids) <= 64, spec
        assert "rapport" in text and "funny caption" in text and "scene" not in text, (spec, text)
        # A caption longer than the whole budget still gives a valid input (real captions can be).
        (ids,) = encode(tokenizer, [prompt], ["ha " * 200], 64)
        assert len(ids) <= 64 and "funny caption" in tokenizer.decode(ids)


def test_dpo_with_lora_from_the_new_pad_token(tmp_path, datasets_dir, monkeypatch):
    out = tmp_path / "dpo"
    # Relative paths, as typed on a command line: the workers run elsewhere and must still find them.
    monkeypatch.chdir(tmp_path)
    dpo.run(dpo.Config(output_dir="dpo", dataset_dir=os.path.relpath(datasets_dir, tmp_path), model_name="tiny",
                       lora_r=8, new_padding_token=True, beta=0.1, loss_type=["sigmoid", "sft"], **SMALL))
    metrics = metrics_of(out)
    assert steps_logged(metrics) == [1, 2, 3, 4]
    assert "eval_rewards/accuracies" in metrics["eval"] and "eval_rewards/margins" in metrics["eval"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out / "final" / "merged")
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert merged.get_input_embeddings().num_embeddings >= len(tokenizer)


def test_dpo_on_diverse_pairs_from_a_best_of_n_pool(tmp_path, datasets_dir, monkeypatch):
    """`bon --split train` scores a pool of captions; `dpo --pairs diverse` builds its pairs from it (each chosen
    caption scored above its rejected one) and trains on them alone, evaluating on the dataset's pairs."""
    import pandas as pd

    from humor_ray.infer import generate

    pool = tmp_path / "pool"
    generate.run_bon(generate.BonConfig(dataset_dir=str(datasets_dir), output_dir=str(pool), model_name="tiny",
                                        split="train", n=2, candidates_factor=4, max_new_tokens=12,
                                        reward_model="builtin:vowel_share", engine="hf"))
    record = tmp_path / "rows"
    monkeypatch.setenv("HUMOR_RAY_RECORD_TRAIN_ROWS", str(record))
    out = tmp_path / "dpo"
    dpo.run(dpo.Config(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny", lora_r=8,
                       pairs="diverse", pairs_from=str(pool), pairs_per_contest=3,
                       **{**SMALL, "max_steps": 2, "eval_steps": 2, "save_steps": 2}))
    pairs = pd.read_parquet(out / "pairs" / "train")
    candidates = pd.read_parquet(pool / "candidates.parquet")
    assert set(pairs["contest"]) == {530} and 1 <= len(pairs) <= 3
    reward = candidates.groupby("caption")["reward"].agg(["min", "max"])
    assert all(reward.loc[c, "min"] > reward.loc[r, "max"] for c, r in zip(pairs["chosen"], pairs["rejected"]))
    # The worker held the pool's pairs, not the dataset's thousands of human pairs of contest 530.
    assert len((record / "rank0-rows.jsonl").read_text().splitlines()) == len(pairs)
    metrics = metrics_of(out)
    assert steps_logged(metrics) == [1, 2] and "eval_loss" in metrics["eval"]


def test_each_worker_trains_on_each_of_its_rows_once_per_epoch(tmp_path, datasets_dir, monkeypatch):
    """Ray Data gives each worker its shard; the trainer must not shard it again by rank (with 2 workers each
    would see half of its rows per epoch, and a fixed number of steps would repeat some and skip others).
    The split streams through Ray Data as a large one would (the workers read a small one themselves)."""
    from collections import Counter

    from humor_ray.train import launcher

    monkeypatch.setattr(launcher, "DIRECT_READ_BYTES", 0)
    record = tmp_path / "rows"
    monkeypatch.setenv("HUMOR_RAY_RECORD_TRAIN_ROWS", str(record))
    config = dict(output_dir=str(tmp_path / "sft"), dataset_dir=str(datasets_dir), model_name="tiny",
                  simple_prompt=True, num_workers=2, do_eval=False, **SMALL)
    managers_before = actors_started("DatasetManager")
    sft.run(sft.Config(**config))
    assert actors_started("DatasetManager") == managers_before + 1  # Ray Train's actor that splits the stream
    held = {}
    for rank in (0, 1):
        rows = (record / f"rank{rank}-rows.jsonl").read_text().splitlines()
        consumed = (record / f"rank{rank}-consumed.jsonl").read_text().splitlines()
        assert len(consumed) == SMALL["max_steps"] * SMALL["per_device_train_batch_size"]
        # Epoch by epoch, every row the worker holds exactly once (the last epoch may stop early).
        for start in range(0, len(consumed), len(rows)):
            epoch = Counter(consumed[start:start + len(rows)])
            assert epoch <= Counter(rows), f"rank {rank}: a row twice in one epoch, or one it does not hold"
            if start + len(rows) <= len(consumed):
                assert epoch == Counter(rows), f"rank {rank}: rows left out of a whole epoch"
        held[rank] = Counter(rows)
    assert held[0] != held[1]  # each worker holds its own shard


# ZeRO-3 (sharded weights) runs in CI; ZeRO-2 and ZeRO-3 with offload (two minutes here) are opt-in with
# `-m slow`, to keep the suite under 20 minutes on two cores.
@pytest.mark.parametrize("zero", ["zero3", pytest.param("zero2", marks=pytest.mark.slow),
                                  pytest.param("zero3_offload", marks=pytest.mark.slow)])
def test_two_workers_under_deepspeed(tmp_path, datasets_dir, zero):
    out = tmp_path / zero
    sft.run(sft.Config(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny", simple_prompt=True,
                       num_workers=2, deepspeed=zero, **SMALL))
    metrics = metrics_of(out)
    assert steps_logged(metrics) == [1, 2, 3, 4]
    from transformers import AutoModelForCausalLM

    # Saved whole (gathered from both workers' partitions), not as empty ZeRO-3 placeholders.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.get_input_embeddings().weight.shape[0] > 1000


def test_a_killed_worker_is_restarted_and_training_resumes(tmp_path, datasets_dir):
    out = tmp_path / "killed"
    config = sft.Config(output_dir=str(out), dataset_dir=str(datasets_dir), model_name="tiny", simple_prompt=True,
                        **{**SMALL, "max_steps": 40, "eval_steps": 5, "save_steps": 5, "per_device_train_batch_size": 8,
                           "max_failures": 1})
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if registered_checkpoints(pafs.LocalFileSystem(), str(out / "ray" / "sft")):
                for worker in our_processes("ray::RayTrainWorker"):
                    os.kill(worker.pid, signal.SIGKILL)
                    killed.append(worker.pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    sft.run(config)
    killer.join()
    assert killed, "no training worker was found to kill"
    metrics = metrics_of(out)
    assert metrics["resumed_from"], "the restarted worker did not resume from a checkpoint"
    steps = steps_logged(metrics)
    assert steps[-1] == 40 and steps == sorted(set(steps))


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="multiple of --eval_steps"):
        sft.Config(output_dir=str(tmp_path), dataset_dir=str(tmp_path), eval_steps=3, save_steps=4)
    with pytest.raises(ValueError, match="--report_to nonsense"):
        sft.Config(output_dir=str(tmp_path), dataset_dir=str(tmp_path), report_to=["nonsense"])
    with pytest.raises(ValueError, match="--deepspeed"):
        sft.Config(output_dir=str(tmp_path), dataset_dir=str(tmp_path), deepspeed="zero9")


def test_missing_datasets_say_what_to_run(tmp_path):
    from humor_ray.config import UserError

    with pytest.raises(UserError, match="run `humor-ray data build` first"):
        rm.run(rm.Config(output_dir=str(tmp_path / "out"), dataset_dir=str(tmp_path / "nothing")))


def test_dpo_cuts_long_prompts_from_the_front():
    import datasets
    import pyarrow as pa

    from humor_ray.models import registry

    tokenizer = registry.load_tokenizer("tiny")
    rows = datasets.Dataset(pa.table({"prompt": ["scene: " + "word " * 300 + "funny caption:", "funny caption:"],
                                      "chosen": [" a", " b"], "rejected": [" c", " d"]}))
    cut = dpo._cut_prompts(rows, tokenizer, 16)
    assert len(tokenizer(cut[0]["prompt"], add_special_tokens=False)["input_ids"]) <= 16
    assert cut[0]["prompt"].endswith("funny caption:") and "scene" not in cut[0]["prompt"]
    assert cut[1] == {"prompt": "funny caption:", "chosen": " b", "rejected": " d"}
