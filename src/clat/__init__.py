"""clat: Criticality-Leveraged Adversarial Training for PyTorch.

Typical use::

    import clat
    model = clat.create_model("resnet18")          # or any nn.Module on [0, 1] images
    layers = clat.find_layers(model)
    crit = clat.compute_criticality(model, layers, x, y)
    print([l.name for l in crit.top_k(1)])
    cfg = clat.load_config(overrides=["data.dataset=bundled", "pretrain.epochs=2", "finetune.epochs=2"])
    clat.train(cfg, "runs/example", model=model)      # callbacks=[...]: clat.Callback objects; best/ holds the best epoch
    print(clat.evaluate(model, x_test, y_test, clat.ThreatModel(steps=20)))   # one threat model value everywhere
    res = clat.benchmark(model, x_test, y_test, attacks=["pgd", "autoattack"])  # clat eval's protocol, one call
"""

from clat.base.versions import __version__  # noqa: F401
from clat.attacks.threat import Shard, ThreatModel, fgsm_rs, perturb, pgd
from clat.training.callbacks import Callback, LiveRun
from clat.config.schema import Config
from clat.config.load import load_config
from clat.criticality.index import CriticalityResult, compute_criticality, select_random
from clat.data.loader import Splits
from clat.data.stream import DatasetSplits
from clat.base.errors import CheckpointError, ClatError, ConfigError, DataError
from clat.eval.accuracy import evaluate
from clat.eval.protocol import EvalProtocol, EvalResult, run_protocol
from clat.eval.benchmark import benchmark
from clat.layers.discovery import find_layers, Layer, resolve_layers
from clat.layers.capture import FeatureExtractor
from clat.layers.freezing import freeze_all_but, set_bn_train_mode, unfreeze_all
from clat.training.loop import train
from clat.methods import CLAT, EpochContext, Method, create_method, list_methods
from clat.training.stage import Stage
from clat.models import Normalize, create_model, list_models, register_model
from clat.analysis.oracle import SweepSettings, layer_sweep


__all__ = [
    "CLAT", "Callback", "CheckpointError", "ClatError", "Config", "ConfigError", "CriticalityResult", "DataError", "DatasetSplits",
    "EvalProtocol",
    "EvalResult", "FeatureExtractor", "Layer", "Method", "Normalize", "Shard", "Splits", "SweepSettings", "ThreatModel", "benchmark",
    "compute_criticality",
    "create_method", "create_model",
    "evaluate", "fgsm_rs", "find_layers", "freeze_all_but", "layer_sweep", "list_methods", "list_models", "load_config",
    "perturb", "pgd", "register_model", "resolve_layers", "run_protocol", "select_random", "train",
    # a training loop of one's own (docs/own_loop.md) and callbacks that act on the run
    "EpochContext", "LiveRun", "Stage", "set_bn_train_mode", "unfreeze_all",
]
