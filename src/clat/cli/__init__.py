"""The `clat` command line."""

from __future__ import annotations

from clat.cli.main import (log, build_parser, cmd_train, cmd_report, cmd_layer_sweep, cmd_demo, COMMANDS, main)  # noqa: F401

__all__ = ['log', 'build_parser', 'cmd_train', 'cmd_report', 'cmd_layer_sweep', 'cmd_demo', 'COMMANDS', 'main']
