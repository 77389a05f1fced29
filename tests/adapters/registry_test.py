"""Every adapter method in the package is found by name from a fresh process.

``get_method(name)`` imports the package ``jaxpeft.adapters.methods`` on first use, so a method is reachable
from a fresh process when the class registered as ``name`` is defined in the module
``jaxpeft.adapters.methods.<name>`` (one file per method, imported by the package).
"""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import jaxpeft.adapters
import jaxpeft.adapters.methods
from jaxpeft.adapters.core import AdapterMethod


def _registered_methods() -> dict[str, str]:
  """``{registered name: defining module}`` over every module of ``jaxpeft.adapters`` and its methods."""
  methods = {}
  for info in [
      *pkgutil.iter_modules(jaxpeft.adapters.__path__, "jaxpeft.adapters."),
      *pkgutil.iter_modules(jaxpeft.adapters.methods.__path__, "jaxpeft.adapters.methods."),
  ]:
    module = importlib.import_module(info.name)
    for cls in vars(module).values():
      if (
          inspect.isclass(cls)
          and issubclass(cls, AdapterMethod)
          and cls.__module__ == module.__name__
          and vars(cls).get("name")
      ):
        methods[cls.name] = cls.__module__
  return methods


def test_every_method_is_found_by_name_in_a_fresh_process():
  methods = _registered_methods()
  assert {"lora", "houlsby", "prompt_tuning", "vpt"} <= set(methods), methods
  assert all(module == f"jaxpeft.adapters.methods.{name}" for name, module in methods.items()), methods
  script = (
      "import sys\n"
      "from jaxpeft.adapters.core import get_method\n"
      "for name in sys.argv[1:]:\n"
      "    assert type(get_method(name)).__module__ == f'jaxpeft.adapters.methods.{name}', name\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", script, *sorted(methods)], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr


def test_list_methods_and_an_unknown_name_list_every_method_in_a_fresh_process():
  expected = sorted(_registered_methods())
  script = (
      "import sys\n"
      "import jaxpeft.adapters\n"
      "try:\n"
      "    jaxpeft.adapters.get_method('lorra')\n"
      "except ValueError as e:\n"
      "    print(e)\n"
      "print(jaxpeft.adapters.list_methods())\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  error, listed = result.stdout.strip().splitlines()
  assert listed == str(expected)
  assert str(expected) in error and len(expected) >= 26, error
