"""The optional extras of ``pyproject.toml`` and one check, made before any slow work, that names the one to install.

``pip install -e .`` installs neither extra. ``multitask export --format onnx|int8`` and ``predict --engine
onnx|int8`` need ``multitask[export]`` (tf2onnx and onnx write ONNX, ONNX Runtime and LiteRT run the exports for
their self-checks and predictions); ``multitask serve`` needs ``multitask[serve]``. Without this check a missing
module surfaced as a ``ModuleNotFoundError`` traceback, or, for int8, after a 22 s conversion.
"""

from __future__ import annotations

import importlib.util

from multitask.errors import ConfigError

# What each use needs: (extra, the modules it imports; a tuple inside names alternatives, any one will do).
NEEDS: dict[str, tuple[str, tuple]] = {
    "onnx export": ("export", ("tf2onnx", "onnx", "onnxruntime")),
    "int8 export": ("export", ("ai_edge_litert",)),
    "onnx engine": ("export", ("onnxruntime",)),
    "int8 engine": ("export", ("ai_edge_litert",)),
    "serve": ("serve", ("fastapi", "uvicorn", ("python_multipart", "multipart"))),
}
DISTRIBUTIONS = {"ai_edge_litert": "ai-edge-litert", "python_multipart": "python-multipart",
                 "multipart": "python-multipart"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a module set to None
        return False


def missing_modules(use: str) -> list[str]:
    """The packages ``use`` (a key of :data:`NEEDS`) needs that are not installed, by their pip names."""
    _, modules = NEEDS[use]
    missing = []
    for wanted in modules:
        options = wanted if isinstance(wanted, tuple) else (wanted,)
        if not any(_installed(module) for module in options):
            missing.append(DISTRIBUTIONS.get(options[0], options[0]))
    return missing


def require_extra(use: str) -> None:
    """Raise :class:`ConfigError` naming the ``pip install`` to run when ``use`` lacks one of its packages."""
    missing = missing_modules(use)
    if missing:
        extra = NEEDS[use][0]
        raise ConfigError(f"{use} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                          f"pip install 'multitask[{extra}]' (in a source checkout: pip install -e '.[{extra}]')")
