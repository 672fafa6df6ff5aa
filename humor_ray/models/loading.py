"""Loading Hugging Face models safely from several threads of one process.

While `from_pretrained` builds a model, transformers replaces `PreTrainedModel.tie_weights` with a no-op and
afterwards puts back whatever it found there. Two loads at once in one process (stages side by side are
threads of one driver) can therefore leave the no-op in place for good, and every later model of that process
keeps an output layer that is neither tied to its embeddings nor loaded (SmolLM2's, for one). (Transformers
pull request 44940, open, would make the switch thread-local.) Every model load, and everything else that
ties weights (a resize of the embeddings, a preset's build in `registry._cached`), holds `MODEL_LOADING`.
"""

from __future__ import annotations

import threading

MODEL_LOADING = threading.RLock()


def from_pretrained(model_class, *args, **kwargs):
    """`model_class.from_pretrained(*args, **kwargs)`, one load at a time in this process."""
    with MODEL_LOADING:
        return model_class.from_pretrained(*args, **kwargs)
