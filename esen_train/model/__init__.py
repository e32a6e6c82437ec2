"""The eSEN model: `ESEN(config)`, its `ModelConfig`, and the presets in configs/model/."""
from esen_train.model.config import ModelConfig, load_model_config
from esen_train.model.esen import ESEN

__all__ = ["ESEN", "ModelConfig", "load_model_config"]
