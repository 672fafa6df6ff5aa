"""`humor-ray` itself, in-process and without Ray: a mistake in the stage, the flags or the inputs is one line
`humor-ray STAGE: error: ...` with exit code 2, found before any work starts."""

import os
import subprocess
import sys

import pytest

from humor_ray.cli import main

TRAIN = ["--output_dir", "/tmp/out", "--dataset_dir", "/tmp/ds"]


def error_of(capsys, argv: list[str]) -> str:
    """The one line a refused command prints (exit code 2, nothing else on either stream)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err.rstrip("\n")


def test_an_unknown_stage_names_what_was_typed_and_the_nearest_stage(capsys):
    assert error_of(capsys, ["sfft", "--max_steps", "5"]) == (
        "humor-ray: error: unknown stage 'sfft' (did you mean sft?)")
    assert error_of(capsys, ["data", "biuld"]) == (
        "humor-ray: error: unknown stage 'data biuld' (did you mean data build?)")
    assert error_of(capsys, ["zzz"]) == "humor-ray: error: unknown stage 'zzz' (humor-ray --help lists the stages)"


def test_flags_are_never_abbreviated(capsys):
    """`--max_st 5` was silently `--max_steps 5`; `--model` was 'ambiguous' between --model_name and its alias."""
    assert error_of(capsys, ["sft", *TRAIN, "--max_st", "5"]) == (
        "humor-ray sft: error: unrecognized option --max_st (did you mean --max_steps?)")
    assert error_of(capsys, ["generate", *TRAIN, "--model", "tiny"]) == (
        "humor-ray generate: error: unrecognized option --model (did you mean --model_name?)")
    assert error_of(capsys, ["sft", *TRAIN, "5"]) == (
        "humor-ray sft: error: unexpected argument '5' (every value follows its --flag)")


@pytest.mark.parametrize("argv, line", [
    (["sft", *TRAIN, "--learning_rate", "-1"], "humor-ray sft: error: --learning_rate -1.0: must be > 0"),
    (["sft", *TRAIN, "--max_steps", "abc"],
     "humor-ray sft: error: argument --max_steps/--max-steps: expected a whole number, got 'abc'"),
    (["sft", "--dataset_dir", "/tmp/ds"], "humor-ray sft: error: --output_dir is required"),
    (["report", "--judge_dir", "/tmp/j"],
     "humor-ray report: error: --generations, --dataset_dir, --output_dir are required"),
    (["data", "build", "--input", "in", "--output", "out", "--max-pairs-per-contest", "-5"],
     "humor-ray data build: error: --max_pairs_per_contest -5: must be >= 1"),
])
def test_a_bad_flag_is_one_line_with_exit_code_2(capsys, argv, line):
    assert error_of(capsys, argv) == line


def test_a_model_is_checked_before_any_cluster_starts(capsys, tmp_path):
    """A causal-LM stage given an encoder preset, and a mistyped path that is also a valid hub id."""
    assert error_of(capsys, ["sft", *TRAIN, "--model_name", "minilm"]) == (
        "humor-ray sft: error: --model_name minilm: the minilm preset loads as reward or embedding, and "
        "--model_name needs a causal_lm model")
    assert error_of(capsys, ["generate", *TRAIN, "--model_name", "runs/sftt"]) == (
        "humor-ray generate: error: --model_name runs/sftt: not a preset (tiny, smollm2-135m, minilm, tiny-llava, "
        "smollm2-llava, mpnet) and no model directory at that path; a Hugging Face id takes the hf: prefix "
        "(hf:runs/sftt)")
    assert "did you mean the preset tiny?" in error_of(capsys, ["dpo", *TRAIN, "--model_name", "tinyy"])
    assert "not a Hugging Face id: write hf:OWNER/NAME" in error_of(capsys, ["rm", *TRAIN, "--model_name", "hf:x"])


def test_a_command_checks_its_options_and_models_without_importing_torch(tmp_path):
    """Every command parses and checks its flags (model specs too) before it starts Ray or any library: importing
    torch and transformers there cost each command 4 s before its first line of work."""
    script = (
        "import sys\n"
        "from humor_ray.cli import STAGES\n"
        "from humor_ray.config import parse_config\n"
        "from humor_ray.train import dpo, sft\n"
        f"parse_config(sft.Config, ['--output_dir', {str(tmp_path)!r}, '--dataset_dir', {str(tmp_path)!r},"
        " '--model_name', 'tiny'], 'humor-ray sft')\n"
        f"parse_config(dpo.Config, ['--output_dir', {str(tmp_path)!r}, '--dataset_dir', {str(tmp_path)!r},"
        f" '--model_name', 'smollm2-135m', '--model_checkpoint_name', {str(tmp_path)!r}], 'humor-ray dpo')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'vllm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_input_path_that_does_not_exist_is_an_error(capsys, tmp_path):
    """`--images` that does not exist built the datasets without images."""
    missing = tmp_path / "no-images"
    assert error_of(capsys, ["data", "build", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                             "--images", str(missing)]) == (
        f"humor-ray data build: error: --images {missing}: no such file or directory")


def test_the_command_runs_offline_unless_the_environment_says_otherwise(monkeypatch, capsys):
    """Set at the entry point, before any stage resolves a model (generate resolved on the driver, online)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a download, asked for
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_help_lists_the_stages(capsys):
    assert main(["--help"]) == 0
    assert "humor-ray data build" in capsys.readouterr().out


def test_address_before_the_stage_names_the_cluster_to_join(capsys, monkeypatch):
    from humor_ray.cli import take_address

    # Set, then deleted: monkeypatch then puts the variable back as it was (absent) after the test, whatever
    # take_address left in it; a leftover address would send later tests' commands to a cluster long gone.
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.delenv("RAY_ADDRESS")
    assert take_address(["--address", "10.0.0.1:6379", "sft", "--max_steps", "2"]) == ["sft", "--max_steps", "2"]
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert take_address(["--address=auto", "rm"]) == ["rm"] and os.environ["RAY_ADDRESS"] == "auto"
    assert take_address(["sft", "--address", "x"]) == ["sft", "--address", "x"]  # a stage's flags stay its own
    assert error_of(capsys, ["--address", "--max_steps"]) == (
        "humor-ray: error: --address needs a value (a Ray cluster's address, or auto)")
