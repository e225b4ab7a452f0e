"""Parsing and Stanford's filters on hand-written teacher answers; ROUGE-L dedupe against
rouge-score's own RougeScorer; the request prompt's structure; seed task formats."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA
from rouge_score import rouge_scorer

from lora_alpaca.errors import UsageError
from lora_alpaca.selfinstruct.dedupe import RougeIndex
from lora_alpaca.selfinstruct.parse import filter_reason, parse_answer
from lora_alpaca.selfinstruct.prompt import encode_prompt
from lora_alpaca.selfinstruct.seeds import DEFAULT_SEED_TASKS, load_seed_tasks

GOOD = "Name three rivers that flow through Europe."


def block(
    n: int, instruction: str, task_input: str = "<noinput>", output: str = "An answer."
) -> str:
    return f"{n}. Instruction: {instruction}\n{n}. Input:\n{task_input}\n{n}. Output:\n{output}\n"


def test_completion_continuation_and_noinput():
    # a completions answer continues "4. Instruction:" of the prompt
    text = (
        " Give two synonyms for the word happy.\n4. Input:\n<noinput>\n4. Output:\nglad, cheerful\n"
        "###\n" + block(5, "Rewrite the sentence in the passive voice.", "The cat ate the fish.")
    )
    parsed = parse_answer(text, "stop", 3)
    assert parsed.rejected == []
    assert parsed.tasks == [
        {
            "instruction": "Give two synonyms for the word happy.",
            "input": "",
            "output": "glad, cheerful",
        },
        {
            "instruction": "Rewrite the sentence in the passive voice.",
            "input": "The cat ate the fish.",
            "output": "An answer.",
        },
    ]


def test_chat_preamble_is_ignored():
    text = (
        "Sure! Here are more tasks:\n\n"
        + block(4, GOOD)
        + "###\n"
        + block(5, "Explain how a rainbow forms in the sky.")
    )
    parsed = parse_answer(text, "stop", 3)
    assert [t["instruction"] for t in parsed.tasks] == [
        GOOD,
        "Explain how a rainbow forms in the sky.",
    ]
    assert parsed.rejected == []


def test_truncated_last_item_dropped_only_when_cut_by_length():
    text = (
        block(4, GOOD)
        + "###\n5. Instruction: Describe the water cycle in simple words.\n5. Input:\n<noin"
    )
    cut = parse_answer(text, "length", 3)
    assert [t["instruction"] for t in cut.tasks] == [GOOD]
    assert [r for r, _ in cut.rejected] == ["truncated"]
    # the same text ended by a stop string: the last block is judged on its own (malformed)
    stopped = parse_answer(text, "stop", 3)
    assert [r for r, _ in stopped.rejected] == ["malformed"]
    # cut right after a separator: nothing was truncated, nothing is dropped
    whole = parse_answer(block(4, GOOD) + "###\n", "length", 3)
    assert [t["instruction"] for t in whole.tasks] == [GOOD] and whole.rejected == []


def test_numbering_drift_keeps_consistent_blocks():
    # numbers skip (4, 7) and restart (2): each block agrees with itself, so all are kept
    text = "\n###\n".join(
        [
            block(4, GOOD),
            block(7, "Suggest a name for a friendly robot dog."),
            block(2, "Classify the animal as a mammal or a bird.", "penguin"),
        ]
    )
    parsed = parse_answer(text, "stop", 3)
    assert len(parsed.tasks) == 3 and parsed.rejected == []
    # a block whose labels disagree (8. Instruction, 9. Input) is malformed
    bad = "8. Instruction: Explain what a leap year is.\n9. Input:\n<noinput>\n9. Output:\nx\n"
    assert [r for r, _ in parse_answer(bad, "stop", 3).rejected] == ["malformed"]
    missing = "8. Instruction: Explain what a leap year is.\n8. Output:\nx\n"
    assert [r for r, _ in parse_answer(missing, "stop", 3).rejected] == ["malformed"]


def test_markdown_heading_in_output_does_not_split():
    text = block(
        4, "Write a recipe for a simple tomato soup.", output="### Ingredients\n- tomatoes"
    )
    parsed = parse_answer(text, "stop", 3)
    assert parsed.tasks[0]["output"] == "### Ingredients\n- tomatoes"


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("Sort these words.", "too_short"),  # 3 words: Stanford drops <= 3
        (" ".join(["word"] * 151), "too_long"),
        ("Draw a cat sitting on a mat.", "blacklisted"),
        ("Describe the IMAGES in this text briefly.", "blacklisted"),
        ("Tell me how to go to the station.", "blacklisted"),
        ("Write a program that adds two numbers.", "write_a_program"),
        ('"Quoted" instructions are not wanted here.', "starts_with_punctuation"),
        ("Élaborez une liste de trois fruits rouges.", "starts_non_ascii"),
    ],
)
def test_each_filter(instruction, reason):
    assert filter_reason(instruction, "An answer.") == reason
    parsed = parse_answer(block(4, instruction), "stop", 3)
    assert parsed.tasks == [] and parsed.rejected[0][0] == reason


def test_filters_keep_edge_cases():
    assert filter_reason("Sort these four words.", "x") is None  # 4 words
    assert filter_reason(" ".join(["word"] * 150), "x") is None
    assert (
        filter_reason("Explain the filesystem hierarchy of Linux.", "x") is None
    )  # not whole word
    assert filter_reason("Write a poem about the sea.", "x") is None
    assert filter_reason("Explain what an ocean current is.", "") == "empty_output"


def test_dedupe_scores_equal_rouge_score_and_threshold_decisions(alpaca_json):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = json.loads(alpaca_json.read_text())
    pool = [r["instruction"] for r in rows[:3000]]
    rng = random.Random(0)
    kept = rng.sample(pool, 150) + ["", "!!!", " ".join(f"w{i}" for i in range(90))]
    queries = rng.sample(pool, 40) + [
        kept[0],  # identical: 1.0
        kept[1] + " Please.",  # near copy: above 0.7
        " ".join(f"w{i}" for i in range(70)) + " tail",  # > 64 tokens: multi-word bit vectors
        "",
    ]
    index = RougeIndex()
    for text in kept:
        index.add(text)
    above = below = 0
    for q in queries:
        ours = index.scores(q)
        theirs = [scorer.score(q, t)["rougeL"].fmeasure for t in kept]
        assert list(ours) == theirs  # exactly equal floats, not approximately
        if max(theirs) > 0.7:
            above += 1
        else:
            below += 1
        sim = index.similarity(q)
        assert (sim.max_score > 0.7) == (max(theirs) > 0.7)
    assert above >= 3 and below >= 30


def test_prompt_structure():
    seeds = load_seed_tasks(None, 3)
    prompt = encode_prompt(seeds[:3])
    assert "20" in prompt and "<noinput>" in prompt
    assert prompt.endswith("###\n4. Instruction:")
    for n in (1, 2, 3):
        assert (
            f"{n}. Instruction: " in prompt
            and f"{n}. Input:\n" in prompt
            and f"{n}. Output:\n" in prompt
        )


def test_seed_formats(tmp_path):
    shipped = load_seed_tasks(None, 3)
    assert len(shipped) == 40 and DEFAULT_SEED_TASKS.parent.name == "selfinstruct"
    stanford = load_seed_tasks(str(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl"), 3)
    assert len(stanford) == 175 and set(stanford[0]) == {"instruction", "input", "output"}
    alpaca = tmp_path / "seeds.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi to the user.", "output": "Hi!"}] * 3))
    assert load_seed_tasks(str(alpaca), 3)[0] == {
        "instruction": "Say hi to the user.",
        "input": "",
        "output": "Hi!",
    }
    with pytest.raises(UsageError, match="row 2"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
        load_seed_tasks(str(bad), 1)
    with pytest.raises(UsageError, match="needs at least 5"):
        load_seed_tasks(str(alpaca), 5)


def test_blocks_without_separators_are_split_at_instruction_lines():
    text = (
        block(4, GOOD)
        + block(5, "Explain how a rainbow forms in the sky.")
        + "6. Instruction: Sum\n6. Output:\nx"
    )
    parsed = parse_answer(text, "stop", 3)
    assert [t["instruction"] for t in parsed.tasks] == [
        GOOD,
        "Explain how a rainbow forms in the sky.",
    ]
    assert [r for r, _ in parsed.rejected] == ["malformed"]
