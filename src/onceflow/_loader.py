"""Load a user's App from a 'module:attribute' string, as `onceflow run` and chaos do."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from ._errors import ConfigError


def load_object(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{target!r} is not MODULE:ATTRIBUTE (for example payments:app)")
    # Like `python -m`, the working directory is importable, so `payments:app` finds
    # payments.py where the user runs the command.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module '{module_name}': {exc}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ConfigError(f"module '{module_name}' has no attribute '{attr}'") from exc
    return obj


def load_app(target: str) -> Any:
    import inspect

    from ._app import App

    obj = load_object(target)
    # A factory function is called; a class (say, onceflow:Producer) is not an App.
    if inspect.isfunction(obj):
        obj = obj()
    if not isinstance(obj, App):
        raise ConfigError(f"{target!r} is a {type(obj).__name__}, not an onceflow App")
    return obj
