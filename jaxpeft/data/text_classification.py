"""Python standard-library docstrings by topic: a TFDS text-classification set, `jaxpeft_pydoc`.

The text is human-written English that ships with every Python installation: the docstrings of
the standard library's public functions, classes and methods. Each example is the first
paragraph of one docstring (whitespace collapsed; a leading call-signature line such as
`split(sep=None) -> list` is skipped), labelled by the topic of the module it documents:

==========  ===========================================================================
label       modules (`FAMILIES`)
==========  ===========================================================================
text        str, string, re, textwrap, difflib, unicodedata, codecs, locale, shlex, ...
math        int, float, complex, math, cmath, decimal, fractions, statistics, random, ...
files       os, os.path, pathlib, shutil, tempfile, io, zipfile, tarfile, gzip, bz2, ...
internet    socket, ssl, http.*, urllib.*, ftplib, smtplib, imaplib, email.*, mailbox, ...
concurrency threading, multiprocessing.*, concurrent.futures, asyncio, queue, subprocess, ...
formats     bytes, json, csv, xml.*, pickle, configparser, base64, struct, sqlite3, ...
==========  ===========================================================================

A module's public names are its `__all__`, else the names it defines itself; of a class, its
own public methods and properties (not inherited ones). Only a docstring's own text is used
(never an inherited one), and only paragraphs of at least `MIN_WORDS` words. Texts are
deduplicated; a text found under two labels is dropped. Every example records its `source`
("module:Qualified.name") so it can be traced back.

Sizes, as built by CPython 3.11.7 (the text is the running interpreter's, so another Python
version gives slightly different data; the builder is deterministic for a given version). Before
subsampling there are 2290 examples: text 211, math 338, files 472, internet 628, concurrency
348, formats 293. Labels with more than `MAX_PER_CLASS` (400) are subsampled to it (seeded);
each label then gives a `TEST_FRACTION` share (rounded) to the test split, chosen with
`numpy.random.default_rng(SEED)`:

=====  ========  ==================================================================
split  examples  text / math / files / internet / concurrency / formats
=====  ========  ==================================================================
train  1591      169 / 270 / 320 / 320 / 278 / 234
test   399        42 /  68 /  80 /  80 /  70 /  59
=====  ========  ==================================================================

The largest label is 1.9 times the smallest, so report accuracy next to the majority-label
baseline (20.1% of the test split). Paragraphs are short: 9 words at the median, 34 at the 95th
percentile, 128 at most.

Features: `text` (Text), `label` (ClassLabel, names = the labels above), `source` (Text).

Prepare with `PyDoc(data_dir=...).download_and_prepare(file_format="array_record")` (TFDS'
`tfrecord` writer needs TensorFlow, which this project does not install); nothing is downloaded.
"""

import collections
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

# Label -> standard-library modules ("module") or single classes ("module:Class").
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": (
        "builtins:str",
        "string",
        "re",
        "textwrap",
        "difflib",
        "unicodedata",
        "codecs",
        "locale",
        "gettext",
        "shlex",
        "rlcompleter",
        "pprint",
        "reprlib",
        "cmd",
        "tokenize",
        "getopt",
        "html",
    ),
    "math": (
        "builtins:int",
        "builtins:float",
        "builtins:complex",
        "math",
        "cmath",
        "decimal",
        "fractions",
        "numbers",
        "random",
        "statistics",
        "operator",
        "bisect",
        "heapq",
        "itertools",
    ),
    "files": (
        "os",
        "os.path",
        "pathlib",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "filecmp",
        "io",
        "fileinput",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "zlib",
        "mmap",
    ),
    "internet": (
        "socket",
        "ssl",
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "urllib.robotparser",
        "ftplib",
        "smtplib",
        "poplib",
        "imaplib",
        "email.message",
        "email.utils",
        "email.parser",
        "email.headerregistry",
        "email.policy",
        "mailbox",
        "ipaddress",
        "xmlrpc.client",
        "xmlrpc.server",
        "wsgiref.simple_server",
        "wsgiref.handlers",
        "webbrowser",
        "socketserver",
        "mimetypes",
    ),
    "concurrency": (
        "threading",
        "_thread",
        "multiprocessing",
        "multiprocessing.pool",
        "multiprocessing.managers",
        "multiprocessing.shared_memory",
        "multiprocessing.queues",
        "multiprocessing.synchronize",
        "multiprocessing.connection",
        "multiprocessing.process",
        "concurrent.futures",
        "asyncio",
        "queue",
        "sched",
        "subprocess",
        "selectors",
        "signal",
        "contextvars",
    ),
    "formats": (
        "builtins:bytes",
        "builtins:memoryview",
        "json",
        "json.decoder",
        "json.encoder",
        "csv",
        "xml.etree.ElementTree",
        "xml.dom.minidom",
        "xml.dom.pulldom",
        "xml.sax",
        "xml.sax.saxutils",
        "xml.sax.handler",
        "xml.parsers.expat",
        "pickle",
        "pickletools",
        "marshal",
        "configparser",
        "plistlib",
        "base64",
        "binascii",
        "struct",
        "tomllib",
        "html.parser",
        "quopri",
        "netrc",
        "array",
        "sqlite3",
        "shelve",
        "dbm",
        "copyreg",
    ),
}
MIN_WORDS = 5
MAX_PER_CLASS = 400
TEST_FRACTION = 0.2
SEED = 0

_SIGNATURE = re.compile(r"[\w.]+\(.*\)(\s*->.*)?", re.DOTALL)


def first_paragraph(docstring: str | None) -> str | None:
  """The first paragraph of a docstring that is not a call signature, whitespace collapsed."""
  if not isinstance(docstring, str):
    return None
  for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(docstring)):
    text = " ".join(paragraph.split())
    if text and not _SIGNATURE.fullmatch(text):
      return text
  return None


def _public_objects(entry: str) -> list[tuple[str, object]]:
  """(qualified name, object) of a module's public functions and classes, or of one class."""
  module_name, _, attribute = entry.partition(":")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    module = importlib.import_module(module_name)
  if attribute:
    names = [attribute]
  else:
    names = getattr(module, "__all__", None) or [
        n for n, o in vars(module).items() if getattr(o, "__module__", None) == module_name
    ]
  documented = lambda o: inspect.isroutine(o) or inspect.isclass(o)
  objects = []
  for name in sorted(set(names)):
    obj = getattr(module, name, None)
    if name.startswith("_") or not documented(obj):
      continue
    objects.append((f"{module_name}:{name}", obj))
    if inspect.isclass(obj):
      for member, value in sorted(vars(obj).items()):
        if not member.startswith("_") and (documented(value) or isinstance(value, property)):
          objects.append((f"{module_name}:{name}.{member}", value))
  return objects


def collect_examples() -> list[dict[str, str | int]]:
  """Every (deduplicated, unambiguous) example, sorted by source, before subsampling."""
  labels_of: dict[str, set[int]] = collections.defaultdict(set)
  source_of: dict[str, str] = {}
  for label, entries in enumerate(FAMILIES.values()):
    for entry in entries:
      for source, obj in _public_objects(entry):
        text = first_paragraph(obj.__doc__)
        if text is None or len(text.split()) < MIN_WORDS:
          continue
        labels_of[text].add(label)
        source_of[text] = min(source_of.get(text, source), source)
  examples = [
      {"text": text, "label": labels.pop(), "source": source_of[text]}
      for text, labels in labels_of.items()
      if len(labels) == 1
  ]
  return sorted(examples, key=lambda e: (e["source"], e["text"]))


def split_examples() -> dict[str, list[dict[str, str | int]]]:
  """The train and test examples (see the module docstring), each sorted by source."""
  rng = np.random.default_rng(SEED)
  examples = collect_examples()
  splits = {"train": [], "test": []}
  for label in range(len(FAMILIES)):
    members = [e for e in examples if e["label"] == label]
    order = rng.permutation(len(members))[:MAX_PER_CLASS]
    num_test = round(TEST_FRACTION * len(order))
    splits["test"] += [members[i] for i in order[:num_test]]
    splits["train"] += [members[i] for i in order[num_test:]]
  return {k: sorted(v, key=lambda e: e["source"]) for k, v in splits.items()}


class PyDoc(tfds.core.GeneratorBasedBuilder):
  """Standard-library docstring paragraphs labelled by module topic (see the module docstring)."""

  name = "jaxpeft_pydoc"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First paragraphs of stdlib docstrings, 6 topics, 80/20 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "First paragraphs of the docstrings of Python standard-library functions, classes"
            f" and methods, labelled by the topic of their module: {', '.join(FAMILIES)}."
        ),
        features=tfds.features.FeaturesDict(
            {
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(FAMILIES)),
                "source": tfds.features.Text(doc="'module:Qualified.name' the docstring belongs to."),
            }
        ),
        supervised_keys=("text", "label"),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The text ships with the Python interpreter.
    splits = split_examples()
    return {split: self._generate_examples(examples) for split, examples in splits.items()}

  def _generate_examples(self, examples: list[dict[str, str | int]]) -> Iterator[tuple[str, dict]]:
    for example in examples:
      yield example["source"], example
