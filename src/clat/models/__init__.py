"""Model registry: ``create_model(name, num_classes=10)``, ``list_models()``.

Every model takes inputs in [0, 1] pixel space and normalizes inside itself, so
attacks never need to know the data set's mean and standard deviation
(RobustBench's convention).
"""

from clat.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from clat.models import cifar_resnet as _cifar_resnet  # noqa: F401  (registers models)
from clat.models import small as _small  # noqa: F401

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
