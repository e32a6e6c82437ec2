"""The eSEN model: `ESEN(config)`, its `ModelConfig`, and the presets in configs/model/."""
from esen_train.model.config import ModelConfig, load_model_config
from esen_train.model.esen import ESEN, compile_model

__all__ = ["ESEN", "ModelConfig", "compile_model", "load_model_config"]
