"""The TorchTrainer every training stage and PPO run on, less one actor a run without Ray Data never uses."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback


class StageTrainer(TorchTrainer):
    """Ray Train's TorchTrainer. Without `datasets` (the workers read a small split themselves, or PPO's
    prompts) it leaves out the DatasetManager actor that Ray Train starts for every run, datasets or none:
    a process that nothing would call (1.7 CPU-seconds of start-up on a 2-core machine)."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]
