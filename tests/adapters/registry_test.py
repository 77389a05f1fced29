"""Every adapter method in the package is found by name from a fresh process.

``get_method(name)`` imports the package ``jaxpeft.adapters.methods`` on first use, so a method is reachable
from a fresh process when the class registered as ``name`` is defined in the module
``jaxpeft.adapters.methods.<name>`` (one file per method, imported by the package).
"""

import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import jaxpeft
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


def test_the_harness_and_the_peft_format_name_no_method():
  """No registered method name, as a whole word, in ``jaxpeft/train/`` or ``peft_format.py`` (``git grep -w``).

  What is specific to a method lives in its file and is reached through the method's hooks.
  """
  package = pathlib.Path(jaxpeft.__file__).parent
  files = [*sorted((package / "train").rglob("*.py")), package / "adapters" / "peft_format.py"]
  names = jaxpeft.adapters.list_methods()
  assert len(names) >= 26 and len(files) > 5, (names, files)
  word = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)")
  found = [
      f"{path.relative_to(package.parent)}:{number}: {line.strip()}"
      for path in files
      for number, line in enumerate(path.read_text().splitlines(), 1)
      if word.search(line)
  ]
  assert not found, "\n".join(found)
