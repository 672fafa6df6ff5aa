"""The command's errors: a user's mistake is one line, a bug keeps its traceback, also through Ray."""

import subprocess
import sys

import pytest

from humor_ray.cli import user_error
from humor_ray.config import ConfigError

pytestmark = pytest.mark.timeout(300)


def humor_ray(*args):
    return subprocess.run([sys.executable, "-m", "humor_ray", *args], capture_output=True, text=True, timeout=240)


def test_a_bad_flag_is_one_line(tmp_path):
    result = humor_ray("report", "--judge_dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "humor-ray report: error: --generations, --dataset_dir, --output_dir are required"]
    result = humor_ray("report", "--log_level", "loud")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "humor-ray report: error: argument --log_level/--log-level: invalid choice: 'LOUD' (choose from 'DEBUG', "
        "'INFO', 'WARNING', 'ERROR')"]


def test_a_failure_inside_a_stage_shows_its_traceback(tmp_path):
    """A ValueError from a library (here json's, on a damaged winrates.json) is not the user's flag: the
    traceback says where it came from."""
    (tmp_path / "winrates.json").write_text('{"win_rates": [')
    result = humor_ray("report", "--judge_dir", str(tmp_path), "--generations", str(tmp_path),
                       "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "humor_ray/eval/report.py" in result.stderr and "json.decoder.JSONDecodeError" in result.stderr


def test_a_user_error_inside_a_ray_task_is_found_by_its_type(ray_local):
    @ray_local.remote
    def check(flag):
        if flag:
            raise ConfigError(f"--flag {flag}: no such thing")
        raise KeyError("a bug")

    with pytest.raises(Exception) as failure:
        ray_local.get(check.remote("x"))
    assert str(user_error(failure.value)) == "--flag x: no such thing"
    with pytest.raises(Exception) as failure:
        ray_local.get(check.remote(""))
    assert user_error(failure.value) is None
