"""``fhavatar train``: fit FHAvatarNet on preprocessed clips (paper section 3.5 and B).

Public API::

    from pipelines.train import TrainConfig, load_train_config, train
    cfg = load_train_config("train.yaml", ["iterations=3000", "data.val_items=[lp_d14]"])
    result = train(cfg, ["/data/preprocessed"], "runs/exp1", device="cuda", max_minutes=9)

See ``config`` (defaults and the milestone scaling rule), ``data`` (sampling, modes, augmentations), ``losses``
(eq. 6-10), ``loop`` (the loop, outputs, resume) and ``checkpoint``.
"""

from .config import PAPER_ITERATIONS, DataConfig, LossConfig, TrainConfig, load_train_config
from .loop import LOG_COLUMNS, LOSS_TERMS, TrainResult, train
from .mirror import HeadMirror

__all__ = ["PAPER_ITERATIONS", "DataConfig", "LossConfig", "TrainConfig", "load_train_config", "train", "TrainResult",
           "LOG_COLUMNS", "LOSS_TERMS", "HeadMirror"]
