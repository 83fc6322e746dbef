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



def build_model(cfg, num_classes: int, device="cpu"):
    """The zoo model a run config (:class:`clat.config.Config`) names, with ``init=`` loaded, on ``device``."""
    from clat.warmstart import load_init
    from clat.errors import ConfigError

    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data set has {num_classes} classes; drop the override")
    model = create_model(cfg.model.name, num_classes, normalize=cfg.model.normalize, kwargs=cfg.model.kwargs)
    if cfg.init:
        load_init(model, cfg.init, num_classes, reset_head=cfg.init_reset_head)
    return model.to(device)


__all__ = ["PYTHON_MODEL", "ModelInfo", "Normalize", "build_model", "is_factory", "create_model", "list_models", "model_info", "register_model"]
