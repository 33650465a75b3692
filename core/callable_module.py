"""Let a subpackage be called like the API function of the same name.

``cxr_transfer.audit`` is both the subpackage (``cxr_transfer.audit.run``, ...) and the library function
``cxr_transfer.audit(data, ...)``; the same for ``finetune``. Python binds a subpackage to its parent's
attribute as soon as it is imported, so a plain function of that name in ``cxr_transfer/__init__`` would be
replaced by the module. Giving the module object a ``__call__`` keeps both meanings, whatever the import order.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable


def make_module_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name](...)`` call ``function(...)``."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    CallableModule.__call__.__doc__ = function.__doc__
    CallableModule.__name__ = f"{function.__name__}-module"
    sys.modules[module_name].__class__ = CallableModule
