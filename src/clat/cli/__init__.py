"""The `clat` command line."""

from __future__ import annotations

from clat.cli.commands import cmd_demo, cmd_eval, cmd_layer_sweep, cmd_report, cmd_train  # noqa: F401
from clat.cli.main import COMMANDS, build_parser, main  # noqa: F401

__all__ = ['build_parser', 'cmd_demo', 'cmd_eval', 'cmd_layer_sweep', 'cmd_report', 'cmd_train', 'COMMANDS', 'main']
