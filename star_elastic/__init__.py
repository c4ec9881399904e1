"""star-elastic: many-in-one nested reasoning LLMs (Star Elastic) for Hugging Face Nemotron-H models."""

from star_elastic.config import ConfigError, ModelConfig
from star_elastic.hf import CheckpointError, load_model, save_model
from star_elastic.model.hybrid import HybridCache, HybridLM, Masks

__all__ = ["CheckpointError", "ConfigError", "HybridCache", "HybridLM", "Masks", "ModelConfig", "load_model", "save_model"]
__version__ = "0.1.0"
