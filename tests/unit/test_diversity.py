"""Caption diversity: EAD by hand, embedding diversity on clear cases, the paper's released generations."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from humor_ray.config import UserError
from humor_ray.data.generations import read_released, read_wide
from humor_ray.eval.diversity import (
    PAPER_TABLE, PAPER_VOCAB_SIZE, ead, ead_scores, embedding_diversity, method_diversity, paper_words, tokenize,
    vocabulary_size,
)

pytestmark = pytest.mark.timeout(300)

RELEASED_METHODS = {"claude", "gpt4o", "zs", "zs_BoN", "sft", "dpo", "ppo", "llava_sft", "llava_zs",
                    "human_top", "human_200", "human_1000", "human_median"}
# Embedding every released caption takes minutes on two cores: the real-data check embeds these.
EMBEDDED_CONTESTS = 8


def test_tokenize_and_vocabulary():
    assert tokenize("Don't panic, Bob!") == ["don't", "panic", ",", "bob", "!"]
    assert vocabulary_size(["The cat.", "the dog!"]) == 5  # the, cat, ., dog, !
    assert vocabulary_size([]) == 0


def test_ead_by_hand():
    captions = ["a b a", "b c"]
    # Unigrams: C = 5 (a b a b c), distinct 3; expected distinct = 10 * (1 - 0.9**5) = 4.0951.
    assert ead(captions, 1, 10) == pytest.approx(3 / 4.0951)
    # Bigrams: (a b) (b a) (b c): none spans two captions, so C = 3; 10 * (1 - 0.9**3) = 2.71.
    assert ead(captions, 2, 10) == pytest.approx(3 / 2.71)
    # One trigram: 10 * (1 - 0.9) = 1.
    assert ead(captions, 3, 10) == pytest.approx(1.0)
    # No 4-gram at all: C == 0.
    assert math.isnan(ead(captions, 4, 10))
    assert math.isnan(ead([], 1, 10))
    assert math.isnan(ead([""], 1, 10))


def test_ead_counts_repeats_once():
    # Bigrams: (the cat) twice, C = 2, distinct 1; 4 * (1 - (3/4)**2) = 1.75.
    assert ead(["The cat", "the CAT"], 2, 4) == pytest.approx(1 / 1.75)
    # V = 1: every draw is the same token, one distinct n-gram is expected.
    assert ead(["x x x"], 1, 1) == pytest.approx(1.0)
    # Repeating captions lowers EAD; a large V makes it about distinct / C.
    assert ead(["a b", "a b"], 1, 10**6) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError):
        ead(["a"], 1, 0)


def test_paper_words_and_ead_by_hand():
    # '.' and newlines go (joining what they separated), then single spaces split; case and commas stay.
    assert paper_words("Honey,  the dog.\nAte it.") == ["Honey,", "the", "dogAte", "it"]
    # Unigrams of "a b a" + "b c": C = 5, distinct 3; V = 32,000 expects 32000 * (1 - (31999/32000)**5).
    expected = PAPER_VOCAB_SIZE * (1 - ((PAPER_VOCAB_SIZE - 1) / PAPER_VOCAB_SIZE) ** 5)
    assert ead(["a b a", "b c."], 1, PAPER_VOCAB_SIZE, paper_words) == pytest.approx(3 / expected)
    assert ead(["A a"], 1, PAPER_VOCAB_SIZE, paper_words) == pytest.approx(2 / (2 - 1 / PAPER_VOCAB_SIZE))


def test_ead_scores_per_group():
    scores = ead_scores([["a b a", "b c"], ["x"]], vocab_size=10, ns=(1, 2))
    assert list(scores) == [1, 2]
    assert scores[1] == pytest.approx([3 / 4.0951, 1 / 1.0])
    assert scores[2][0] == pytest.approx(3 / 2.71)
    assert math.isnan(scores[2][1])


def test_embedding_diversity():
    same = ["Honey, the dog ate the homework again."] * 4
    paraphrases = ["The dog is barking at the mailman.", "A dog barks at the postman.",
                   "The mailman is being barked at by a dog."]
    unrelated = ["The dog is barking at the mailman.", "Quarterly tax filings are due in April.",
                 "Quantum computers use qubits."]
    same_score, para_score, unrel_score, single = embedding_diversity(
        [same, paraphrases, unrelated, ["Only one.", "  "]], model="minilm", batch_size=4, pairs="distinct")
    assert abs(same_score) < 1e-5
    assert 0.05 < para_score < 0.5
    assert unrel_score > para_score + 0.4
    assert unrel_score <= 1.2
    assert math.isnan(single)


@pytest.mark.parametrize("model", ["minilm", "mpnet"])
def test_paper_pairs_count_each_caption_with_itself(model):
    groups = [["The dog is barking at the mailman.", "Quarterly tax filings are due in April.",
               "Quantum computers use qubits.", "A dog barks at the postman."], ["Same.", "Same."]]
    distinct = embedding_diversity(groups, model=model, pairs="distinct")
    with_self = embedding_diversity(groups, model=model, pairs="with_self")
    # k x k cosines with the k ones of the diagonal: (k - 1) / k times the mean over distinct pairs.
    assert with_self == pytest.approx([3 / 4 * distinct[0], 0.0], abs=1e-6)
    assert 0.3 < distinct[0] < 1.0
    with pytest.raises(UserError, match="unknown pairs"):
        embedding_diversity(groups, pairs="all")


def test_paper_ead_of_every_released_set_matches_the_paper(real_data):
    """The paper's EAD needs no model: every released set, over all its contests, against the table."""
    table = read_released()
    assert set(table["method"]) == set(PAPER_TABLE)
    for method, rows in table.groupby("method"):
        groups = [g["caption"].tolist() for _, g in rows.groupby("contest")]
        scores = ead_scores(groups, PAPER_VOCAB_SIZE, words=paper_words)
        ours = np.mean([np.nanmean(values) for values in scores.values()])
        assert ours == pytest.approx(PAPER_TABLE[method][1], abs=0.005), method


def test_paper_embedding_diversity_of_a_released_set_matches_the_paper(real_data):
    """all-mpnet-base-v2 (the `mpnet` preset, unpacked from its five PyPI parts) on Claude's 910 captions."""
    table = read_released()
    result = method_diversity(table[table["method"] == "claude"])
    assert result["claude"]["contests"] == 91
    assert result["claude"]["embedding"] == pytest.approx(PAPER_TABLE["claude"][0], abs=0.005)
    assert result["claude"]["ead"] == pytest.approx(PAPER_TABLE["claude"][1], abs=0.005)


def test_diversity_command(tmp_path, real_data, capsys):
    from humor_ray.cli import main

    released = real_data / "benchmarks" / "humor_in_ai_examples"
    out = tmp_path / "out"
    args = ["diversity", "--generations", str(released / "gpt4o.csv"), str(released / "human_top.csv"),
            "--contests", "543", "544", "--output_dir", str(out)]
    assert main(args + ["--embedding", "minilm", "--ead", "words", "--pairs", "distinct"]) == 0
    printed = capsys.readouterr().out
    assert "gpt4o" in printed and "human_top" in printed and "ead_5" in printed
    saved = json.loads((out / "diversity.json").read_text())
    assert saved["settings"] == {"embedding": "minilm", "ead": "words", "pairs": "distinct", "contests": [543, 544]}
    words = saved["methods"]
    assert {m: r["contests"] for m, r in words.items()} == {"gpt4o": 2, "human_top": 2}

    assert main(args) == 0  # the paper's definitions
    paper = json.loads((out / "diversity.json").read_text())["methods"]
    for method in ("gpt4o", "human_top"):
        assert paper[method]["ead"] != pytest.approx(words[method]["ead"], abs=1e-4)
        assert 0.3 < paper[method]["embedding"] < 1.0 and 0.5 < paper[method]["ead"] < 1.1

    assert main(["diversity", "--generations", str(released / "gpt4o.csv"), "--contests", "1"]) == 1
    assert "--contests [1]: no method has captions for them" in capsys.readouterr().err
    assert main(["diversity", "--generations", str(released / "gpt4o.csv"), "--ead", "chars"]) == 2
    assert "humor-ray diversity: error: --ead chars: choose from paper, words\n" == capsys.readouterr().err


def test_read_wide(tmp_path):
    path = tmp_path / "ours.csv"
    pd.DataFrame({"caption2": ["  b ", ""], "contest_number": ["7.0", "5"], "prompt": ["p", "q"],
                  "caption1": ["a", "NA"]}).to_csv(path, index=False)
    table = read_wide(path, "ours")
    assert table.to_dict("records") == [
        {"contest": 5, "method": "ours", "sample": 1, "caption": "NA"},
        {"contest": 7, "method": "ours", "sample": 1, "caption": "a"},
        {"contest": 7, "method": "ours", "sample": 2, "caption": "b"},
    ]
    assert table.attrs["empty_captions"] == {"ours": 1}


@pytest.mark.parametrize("columns, problem", [
    ({"contest_number": ["1"], "prompt": ["p"], "cap1": ["a"]}, "caption1..captionN"),
    ({"prompt": ["p"], "caption1": ["a"]}, "contest_number"),
    ({"contest_number": [""], "caption1": ["a"]}, "line 2"),
    ({"contest_number": ["3", "3.0"], "caption1": ["a", "b"]}, "more than one row"),
])
def test_read_wide_errors(tmp_path, columns, problem):
    path = tmp_path / "bad.csv"
    pd.DataFrame(columns).to_csv(path, index=False)
    with pytest.raises(UserError, match=problem) as err:
        read_wide(path, "bad")
    assert str(path) in str(err.value)


def test_read_wide_unreadable(tmp_path):
    with pytest.raises(UserError, match="missing.csv: cannot read"):
        read_wide(tmp_path / "missing.csv", "bad")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty.csv: cannot read"):
        read_wide(tmp_path / "empty.csv", "bad")


def test_released_generations(real_data):
    table = read_released()
    assert set(table["method"]) == RELEASED_METHODS
    assert list(table.columns) == ["contest", "method", "sample", "caption"]
    assert (table["caption"].str.strip() == table["caption"]).all() and (table["caption"] != "").all()

    sizes = table.groupby(["method", "contest"]).size()
    contests = sizes.groupby("method").size()
    assert contests.to_dict() == {m: 357 if m in ("zs", "dpo") else 91 for m in RELEASED_METHODS}
    short = sizes[sizes != 10]
    # sft leaves two captions of contest 746 empty; zs's contest 569 has 9 after repairing its split row.
    assert short.to_dict() == {("sft", 746): 8, ("zs", 569): 9}
    assert table.attrs["empty_captions"] == {m: {"sft": 2, "zs": 1}.get(m, 0) for m in RELEASED_METHODS}

    common = set.intersection(*(set(rows["contest"]) for _, rows in table.groupby("method")))
    assert len(common) == 91 and min(common) == 536 and max(common) == 761

    # EAD of every contest of every method, with one vocabulary for all.
    vocab = vocabulary_size(table["caption"])
    assert 10_000 < vocab < 30_000
    for method, rows in table.groupby("method"):
        groups = [g["caption"].tolist() for _, g in rows.groupby("contest")]
        for n, scores in ead_scores(groups, vocab).items():
            assert all(0.1 < s < 1.1 for s in scores), (method, n)

    sample = table[table["contest"].isin(sorted(common)[:EMBEDDED_CONTESTS])]
    result = method_diversity(sample, model="minilm", ead_kind="words", pairs="distinct")  # ours, the faster
    print(f"\nDiversity of the released generations on {EMBEDDED_CONTESTS} shared contests:")
    print(pd.DataFrame(result).T.sort_index().round(3).to_string())
    assert set(result) == RELEASED_METHODS
    for method, row in result.items():
        assert row["contests"] == EMBEDDED_CONTESTS, method
        assert 9.5 <= row["captions_per_contest"] <= 10, method
        assert 0.3 < row["embedding"] < 1.0, method
        for key in ("ead", "ead_1", "ead_2", "ead_3", "ead_4", "ead_5"):
            assert 0.3 < row[key] < 1.1, (method, key)
    assert result["human_top"]["embedding"] > result["zs_BoN"]["embedding"]
