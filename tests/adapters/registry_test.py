"""Every adapter method in the package is found by name from a fresh process.

``get_method(name)`` imports ``jaxpeft.adapters.<name>`` on first use, so a method is reachable from a fresh
process exactly when the class registered as ``name`` is defined in the module ``jaxpeft.adapters.<name>``
(a method registered from another module, e.g. "vpt" from prompt_tuning.py, is unknown until that other
module happens to be imported).
"""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import jaxpeft.adapters
from jaxpeft.adapters.core import AdapterMethod


def _registered_methods() -> dict[str, str]:
    """``{registered name: defining module}`` over every module of ``jaxpeft.adapters``."""
    methods = {}
    for info in pkgutil.iter_modules(jaxpeft.adapters.__path__, "jaxpeft.adapters."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, AdapterMethod) and cls.__module__ == module.__name__
                    and vars(cls).get("name")):
                methods[cls.name] = cls.__module__
    return methods


def test_every_method_is_found_by_name_in_a_fresh_process():
    methods = _registered_methods()
    assert {"lora", "houlsby", "prompt_tuning", "vpt"} <= set(methods), methods
    assert all(module == f"jaxpeft.adapters.{name}" for name, module in methods.items()), methods
    script = ("import sys\n"
              "from jaxpeft.adapters.core import get_method\n"
              "for name in sys.argv[1:]:\n"
              "    assert type(get_method(name)).__module__ == f'jaxpeft.adapters.{name}', name\n")
    result = subprocess.run([sys.executable, "-c", script, *sorted(methods)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
