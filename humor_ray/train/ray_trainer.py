"""The TorchTrainer every training stage and PPO run on, less two helper actors our runs never need."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback


class StageTrainer(TorchTrainer):
    """Ray Train's TorchTrainer without two of the actors it starts for every run, each a process to start (1.7
    and 2.4 CPU-seconds on a 2-core machine):
    - the DatasetManager, when the run has no `datasets` (the workers read a small split themselves, or PPO's
      prompts): nothing would call it;
    - the placement-group cleaner, a detached actor that asks the state API once a second whether the run's
      controller still lives, to remove the run's placement group should the controller die while the driver
      goes on. A command's driver ends when its run fails, and Ray then removes the group with the controller
      and the job. (The cleaner also finds its cluster through the state API's default address: with two
      clusters on one machine it can ask the wrong one.)"""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [callback for callback in callbacks if not isinstance(callback, unused)]
