"""Credentials never reach logs, error lines or records; images a dataset names stay inside --images."""

import os

import pytest

from humor_ray.config import UserError
from humor_ray.log import get_logger, redact
from humor_ray.models.vision import image_location


@pytest.mark.parametrize("text, shown", [
    ("s3://AKIAEXAMPLE:wJal/rXUtn+FEMI@bucket/x?endpoint_override=h:9000", "s3://***@bucket/x?endpoint_override=h:9000"),
    ("gs://b/x?access_key=A1&secret_key=S2&session_token=T3&region=eu", "gs://b/x?access_key=***&secret_key=***"
                                                                         "&session_token=***&region=eu"),
    ("reading https://user:pw@host:8000/v1 then s3://bucket/p", "reading https://***@host:8000/v1 then s3://bucket/p"),
    ("s3://bucket/dir/a@b.csv", "s3://bucket/dir/a@b.csv"),  # an @ in a path is no credential
])
def test_uri_credentials_are_redacted(text, shown):
    assert redact(text) == shown


def test_log_lines_carry_no_credentials(capsys):
    get_logger("test").warning("cannot read s3://KEY:TOPSECRET@bucket/x")
    err = capsys.readouterr().err
    assert "TOPSECRET" not in err and "s3://***@bucket/x" in err


def test_images_stay_inside_the_images_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "510.jpg").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("not a cartoon")
    os.symlink(tmp_path / "secret.txt", images / "511.jpg")
    assert image_location(str(images), "510.jpg") == str((images / "510.jpg").resolve())
    for name in ("../secret.txt", "/etc/passwd", "sub/../../secret.txt", "511.jpg", "s3://b/k.jpg"):
        with pytest.raises(UserError, match="--images"):
            image_location(str(images), name)
    assert image_location("s3://bucket/images?region=eu", "510.jpg") == "s3://bucket/images/510.jpg?region=eu"
