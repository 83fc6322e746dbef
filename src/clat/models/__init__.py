"""Model registry: ``create_model(name, num_classes=10)``, ``list_models()``.

Every model takes inputs in [0, 1] pixel space and normalizes inside itself, so
attacks never need to know the data set's mean and standard deviation
(RobustBench's convention).

The paper's zoo (CIFAR variants, 10 or 100 classes): ``resnet18``, ``preact_resnet18``,
``resnet50``, ``wrn34_10``, ``wrn70_16``, ``vgg19``, ``densenet121``; plus ``small_cnn``
and ``tiny_cnn`` for CPU work. Sizes, layer counts and layout choices: docs/models.md.
"""

from clat.models.registry import PYTHON_MODEL, ModelInfo, Normalize, create_model, is_factory, list_models, model_info, register_model
from clat.models import cifar_resnet as _cifar_resnet  # noqa: F401  (registers models)
from clat.models import densenet as _densenet  # noqa: F401
from clat.models import preact_resnet as _preact_resnet  # noqa: F401
from clat.models import resnet50 as _resnet50  # noqa: F401
from clat.models import small as _small  # noqa: F401
from clat.models import vgg as _vgg  # noqa: F401
from clat.models import wide_resnet as _wide_resnet  # noqa: F401


__all__ = ["PYTHON_MODEL", "ModelInfo", "Normalize", "is_factory", "create_model", "list_models", "model_info", "register_model"]
