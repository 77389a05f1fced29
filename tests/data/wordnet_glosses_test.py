"""Tests of jaxpeft.data.wordnet_glosses: parsing WordNet's files, the choice of sense, the hash split."""

import hashlib
import os

import pytest

from jaxpeft.data import wordnet_glosses

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n"
# index.<pos>: lemma pos synset_cnt p_cnt [ptr]*p_cnt sense_cnt tagsense_cnt offsets (most frequent first)
INDEX = {
    "noun": ["bank n 2 1 @ 2 3 00000100 00000200", "rare_word n 1 0 1 0 00000300", "run n 1 0 1 1 00000400"],
    "verb": ["run v 1 2 @ ~ 1 5 00000500"],
    "adj": [],
    "adv": [],
}
DATA = {
    "noun": [
        '00000100 03 n 01 bank 0 000 | sloping land beside a body of water; "they pulled the canoe up'
        ' on the bank"',
        "00000200 03 n 01 bank 1 000 | a financial institution",
        "00000300 03 n 01 rare_word 0 000 | something rare",
        "00000400 03 n 01 run 0 000 | a score in baseball",
    ],
    "verb": ["00000500 38 v 01 run 0 000 | move  fast by using one's feet;  "],
    "adj": [],
    "adv": [],
}


@pytest.fixture
def wordnet_dir(tmp_path):
  for pos in wordnet_glosses.PARTS_OF_SPEECH:
    (tmp_path / f"index.{pos}").write_text(HEADER + "".join(line + "  \n" for line in INDEX[pos]))
    (tmp_path / f"data.{pos}").write_text(HEADER + "".join(line + "  \n" for line in DATA[pos]))
  return str(tmp_path)


def test_examples_take_the_most_frequent_tagged_sense_and_its_definition(wordnet_dir):
  splits = wordnet_glosses.split_examples(wordnet_dir)
  examples = sorted(splits["train"] + splits["test"], key=lambda e: e["prompt"])
  # bank: first sense, examples cut; rare_word: never tagged, left out; run: the verb has more tagged senses.
  assert examples == [
      {"prompt": "Define: bank\n", "response": "sloping land beside a body of water", "source": "noun:00000100"},
      {"prompt": "Define: run\n", "response": "move fast by using one's feet", "source": "verb:00000500"},
  ]
  for example in examples:
    lemma = example["prompt"][len("Define: ") : -1]
    digest = int(hashlib.sha256(lemma.encode()).hexdigest()[:16], 16)
    assert (example in splits["test"]) == (digest % 100 < 10)


def test_missing_wordnet_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="wordnet-base"):
    wordnet_glosses.split_examples(str(tmp_path))


@pytest.mark.skipif(
    not os.path.exists(os.path.join(wordnet_glosses.WORDNET_DIR, "data.noun")),
    reason="wordnet-base is not installed (make install-test installs it)",
)
def test_installed_wordnet_gives_disjoint_splits_of_about_ten_percent():
  splits = wordnet_glosses.split_examples()
  train = {e["prompt"] for e in splits["train"]}
  test = {e["prompt"] for e in splits["test"]}
  assert not train & test
  assert 15_000 < len(train) + len(test) < 30_000
  assert 0.08 < len(test) / (len(train) + len(test)) < 0.12
  assert all(e["response"] and '"' not in e["response"][:1] for e in splits["test"])
