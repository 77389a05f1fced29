"""Every command and code block of README.md, as written, in the test suite.

`python -m launch.train` commands run in-process (the launcher's own override parsing, then
`train_and_evaluate`) with the step count shrunk, on one device (a `sharding.model_parallel=N` command:
on N, one model-parallel group), the data in the test's data dir, and workdirs under a temporary
directory: relative ones (`workdir/quickstart`) are kept relative to it, so a later command reads
an earlier one's export as a user's would. The `make` targets are the suite's and
the flagship's entry points (CI runs `make test`), so they are not run from here. The PEFT block
runs in tests/adapters/peft_format_test.py.
"""

import importlib
import os
import pathlib
import re
import shlex
import socket

import pytest

from jaxpeft.train.loop import train_and_evaluate
from launch.config_overrides import apply_overrides, split_argv

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SHRINK = [
    ("num_train_steps", "4"),
    ("log_every", "2"),
    ("eval_every", "0"),
    ("checkpoint.every_steps", "4"),
    ("progress_bar", "false"),
    ("sharding.num_devices", "1"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _commands():
  commands = []
  for block in _blocks("bash"):
    for command in block.replace("\\\n", " ").splitlines():
      words = shlex.split(command, comments=True)
      if words:
        commands.append(words)
  return commands


LAUNCH = [words for words in _commands() if words[:3] == ["python", "-m", "launch.train"]]


def test_readme_commands_are_launch_commands_or_make_targets():
  others = [words for words in _commands() if words not in LAUNCH]
  assert {w[0] for w in others} == {"make"}, others
  assert len(LAUNCH) >= 7


def _load_config(flag):
  path, _, arg = flag.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  return module.get_config(arg or None)


def _shrink(overrides):
  """SHRINK, on as many devices as the command's model axis (`sharding.model_parallel`, default one)."""
  devices = dict(overrides).get("sharding.model_parallel", "1")
  return [(key, devices if key == "sharding.num_devices" else value) for key, value in SHRINK]


def _run(words, data_dir):
  rest, overrides = split_argv(words[3:])
  flags = dict(w.removeprefix("--").split("=", 1) for w in rest)
  config = _load_config(flags["config"])
  config.lock()
  apply_overrides(config, overrides + _shrink(overrides) + [("dataset.data_dir", data_dir)])
  workdir = flags["workdir"]
  return train_and_evaluate(config, workdir.lstrip("/") if os.path.isabs(workdir) else workdir)


def test_every_launch_command_runs(data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)

  def offline(*args, **kwargs):
    raise OSError("network unreachable (test)")

  monkeypatch.setattr(socket, "create_connection", offline)
  for words in LAUNCH:
    if any(w.startswith("--config.dataset.name=") for w in words):  # a download: fails fast offline
      with pytest.raises(RuntimeError, match="needs a download from .*, which cannot be reached"):
        _run(words, str(tmp_path / "tfds_download"))
      continue
    result = _run(words, data_dir)
    assert result["step"] == 4 and "eval" in result, words


def test_library_block_runs_as_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (block,) = [b for b in _blocks("python") if "jaxpeft.optim.came" in b]
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert (tmp_path / "lora.safetensors").is_file()
  assert namespace["logits"].shape == (4, 3)
