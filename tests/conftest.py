"""Shared test set-up: offline, real data from ../shared/data (or $HUMOR_RAY_DATA), one local Ray."""

import os

# Set before anything imports transformers, datasets or Ray.
os.environ.update({
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # For the local S3 server in test_object_store; Ray workers inherit them when Ray starts.
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})

import pytest  # noqa: E402

from humor_ray.config import data_root  # noqa: E402


@pytest.fixture(scope="session")
def real_data():
    root = data_root()
    if not (root / "summaries").is_dir():
        pytest.fail(f"the real contest data is not at {root}: set HUMOR_RAY_DATA to its folder")
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds on two cores), with the
    dashboard as the training stages start it (Ray Train queries the cluster's state through it)."""
    import ray

    from humor_ray.cluster import init_ray

    init_ray(dashboard=True)
    yield ray
    ray.shutdown()


def build_real_datasets(out, real_data, summaries: str, datasets: list[str], images: bool = False):
    """`humor-ray data build` of the real summary files matching `summaries` (a glob under summaries/), with
    the paper's splits, the Humor-in-AI descriptions and, with `images`, the cartoons; only `datasets`."""
    from humor_ray.data import build

    build.run(build.BuildConfig(
        input=str(real_data / "summaries" / summaries), output=str(out),
        splits=str(real_data / "benchmarks" / "humor_in_ai_splits.json"),
        descriptions=[str(real_data / "descriptions" / "humor_in_ai_prompt_descriptions.csv")],
        images=str(real_data / "images") if images else None, datasets=datasets))
    return out
