"""WordNet definitions as instruction/response pairs: a TFDS set for causal-LM tuning, `jaxpeft_wordnet`.

Offline source: Princeton WordNet 3.0 as Debian's `wordnet-base` ships it (`/usr/share/wordnet`; the
Makefile's install-test target installs it where apt-get exists). Each example asks for a word's most
common meaning:

  prompt   "Define: <lemma>\n"
  response "<gloss>"

Which words: the lemmas of the four index files (`index.noun`, `index.verb`, `index.adj`, `index.adv`)
with at least one sense in WordNet's semantically tagged corpus (`tagsense_cnt > 0`, about 23k
lemma/part-of-speech pairs: the common words). A lemma's first listed sense is its most frequent one; its
gloss is the definition part of that synset's gloss in `data.<pos>` (the text before the first `; "`
that starts the usage examples), whitespace collapsed. A lemma in several parts of speech keeps the one
with the most tagged senses (ties: noun, verb, adjective, adverb). Underscores in lemmas become spaces.

Split: a lemma goes to `test` when the first 8 bytes of SHA-256(lemma), as an integer, modulo 100 are
below `TEST_PERCENT` (10), else to `train`; so the split of a word never depends on the rest of the data.
Sizes with Debian 12's wordnet-base (WordNet 3.0): 19304 train, 2094 test examples; glosses have 505
characters at most.

Features: `prompt` (Text), `response` (Text), `source` (Text: "<pos>:<synset offset>").

Prepare with `WordNetGlosses(data_dir=...).download_and_prepare(file_format="array_record")`; nothing is
downloaded.
"""

import hashlib
import os
import re
from collections.abc import Iterator

import tensorflow_datasets as tfds

WORDNET_DIR = "/usr/share/wordnet"
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")  # also the tie-break order
TEST_PERCENT = 10
PROMPT_TEMPLATE = "Define: {lemma}\n"


def _missing_message(directory: str) -> str:
  return (
      f"WordNet data not found in {directory}: install Debian's wordnet-base (`apt-get install -y"
      " wordnet-base`, as `make install-test` does) or pass the directory holding data.noun etc."
  )


def _read_lines(path: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.startswith("  "):  # the license header lines start with two spaces
        yield line


def read_glosses(directory: str, pos: str) -> dict[str, str]:
  """Synset offset -> definition (the gloss before its usage examples) of `data.<pos>`."""
  glosses = {}
  for line in _read_lines(os.path.join(directory, f"data.{pos}")):
    offset, _, gloss = line.partition(" | ")
    definition = re.split(r';\s*"', gloss, maxsplit=1)[0]
    glosses[offset.split(" ", 1)[0]] = " ".join(definition.split()).rstrip(";").strip()
  return glosses


def read_common_senses(directory: str, pos: str) -> dict[str, tuple[int, str]]:
  """Lemma -> (tagged sense count, offset of its most frequent sense) of the tagged lemmas of `index.<pos>`."""
  senses = {}
  for line in _read_lines(os.path.join(directory, f"index.{pos}")):
    fields = line.split()
    # lemma pos synset_cnt p_cnt [ptr_symbol] * p_cnt sense_cnt tagsense_cnt synset_offset ...
    pointer_count = int(fields[3])
    tagged = int(fields[5 + pointer_count])
    if tagged > 0:
      senses[fields[0]] = (tagged, fields[6 + pointer_count])
  return senses


def is_test(lemma: str) -> bool:
  """The deterministic split: True for the lemmas of the test split."""
  return int.from_bytes(hashlib.sha256(lemma.encode("utf-8")).digest()[:8], "big") % 100 < TEST_PERCENT


def split_examples(directory: str = WORDNET_DIR) -> dict[str, list[dict[str, str]]]:
  """The train and test examples (see the module docstring), each sorted by lemma."""
  if not os.path.exists(os.path.join(directory, "data.noun")):
    raise FileNotFoundError(_missing_message(directory))
  best: dict[str, tuple[int, int, str, str]] = {}  # lemma -> (-tagged, pos rank, pos, offset)
  for rank, pos in enumerate(PARTS_OF_SPEECH):
    for lemma, (tagged, offset) in read_common_senses(directory, pos).items():
      candidate = (-tagged, rank, pos, offset)
      best[lemma] = min(best.get(lemma, candidate), candidate)
  glosses = {pos: read_glosses(directory, pos) for pos in PARTS_OF_SPEECH}
  splits = {"train": [], "test": []}
  for lemma in sorted(best):
    _, _, pos, offset = best[lemma]
    gloss, word = glosses[pos][offset], lemma.replace("_", " ")
    if gloss:
      splits["test" if is_test(word) else "train"].append(
          {"prompt": PROMPT_TEMPLATE.format(lemma=word), "response": gloss, "source": f"{pos}:{offset}"}
      )
  return splits


class WordNetGlosses(tfds.core.GeneratorBasedBuilder):
  """'Define: <word>' -> the WordNet gloss of its most frequent sense (see the module docstring)."""

  name = "jaxpeft_wordnet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Glosses of the tagged WordNet 3.0 lemmas' first senses, 90/10 split by hash."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Instruction-style pairs 'Define: <word>' -> WordNet 3.0 gloss of its most frequent sense.",
        features=tfds.features.FeaturesDict(
            {
                "prompt": tfds.features.Text(),
                "response": tfds.features.Text(),
                "source": tfds.features.Text(doc="'<pos>:<synset offset>' of the gloss in WordNet's data files."),
            }
        ),
        supervised_keys=("prompt", "response"),
        homepage="https://wordnet.princeton.edu/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data comes from the installed wordnet-base package.
    splits = split_examples()
    return {split: self._generate_examples(examples) for split, examples in splits.items()}

  def _generate_examples(self, examples: list[dict[str, str]]) -> Iterator[tuple[str, dict]]:
    for example in examples:
      yield example["prompt"], example
