"""Model registry: importing this package registers every built-in model."""

from training.models import cnn, preresnet, vgg, wideresnet  # noqa: F401  (registration)
from training.models.registry import Classifier, create_model, model_names, register_model

__all__ = ["Classifier", "create_model", "model_names", "register_model"]
