"""Prompt templates: the bundled texts are exactly alpaca-lora's, rendering, response
extraction, stop strings, and one-line errors for bad templates or names."""

from __future__ import annotations

import json

import pytest

from lora_alpaca.errors import UsageError
from lora_alpaca.prompts import available_templates, cut_at_stop, load_template

HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
HEAD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)
VIGOGNE_HEAD_INPUT = (
    "Ci-dessous se trouve une instruction qui décrit une tâche, associée à une entrée qui "
    "fournit un contexte supplémentaire. Écrivez une réponse qui complète correctement la "
    "demande.\n\n"
)
VIGOGNE_HEAD_NO_INPUT = (
    "Ci-dessous se trouve une instruction qui décrit une tâche. Écrivez une réponse qui "
    "complète correctement la demande.\n\n"
)
# The template texts of tloen/alpaca-lora's templates/*.json, typed out independently.
ORIGINAL = {
    "alpaca": {
        "prompt_input": HEAD_INPUT
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": HEAD_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:\n",
        "response_split": "### Response:",
    },
    "alpaca_legacy": {
        "prompt_input": HEAD_INPUT
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "prompt_no_input": HEAD_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:",
        "response_split": "### Response:",
    },
    "alpaca_short": {
        "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
        "response_split": "### Response:",
    },
    "vigogne": {
        "prompt_input": VIGOGNE_HEAD_INPUT
        + "### Instruction:\n{instruction}\n\n### Entrée:\n{input}\n\n### Réponse:\n",
        "prompt_no_input": VIGOGNE_HEAD_NO_INPUT
        + "### Instruction:\n{instruction}\n\n### Réponse:\n",
        "response_split": "### Réponse:",
    },
}
STOPS = {
    "alpaca": ("### Instruction:", "### Input:", "### Response:", "\n### "),
    "alpaca_legacy": ("### Instruction:", "### Input:", "### Response:", "\n### "),
    "alpaca_short": ("### Instruction:", "### Input:", "### Response:", "\n### "),
    "vigogne": ("### Instruction:", "### Entrée:", "### Réponse:", "\n### "),
}


def test_the_four_bundled_templates_are_there():
    assert available_templates() == sorted(ORIGINAL)


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_template_text_is_exactly_alpaca_loras(name):
    t = load_template(name)
    want = ORIGINAL[name]
    assert t.prompt_input == want["prompt_input"]
    assert t.prompt_no_input == want["prompt_no_input"]
    assert t.response_split == want["response_split"]
    assert t.name == name


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_build_prompt_with_and_without_input(name):
    t = load_template(name)
    want = ORIGINAL[name]
    with_input = t.build_prompt("Name a {color}.", "Input with {braces} and 100%")
    assert with_input == want["prompt_input"].replace("{instruction}", "Name a {color}.").replace(
        "{input}", "Input with {braces} and 100%"
    )
    assert t.build_prompt("Say hi.") == want["prompt_no_input"].replace("{instruction}", "Say hi.")
    # alpaca-lora: an empty input string selects the no-input prompt
    assert (
        t.build_prompt("Say hi.", "")
        == t.build_prompt("Say hi.", None)
        == t.build_prompt("Say hi.")
    )


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_stop_strings(name):
    assert load_template(name).stop_strings == STOPS[name]


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_get_response_after_split_marker_and_before_next_turn(name):
    t = load_template(name)
    prompt = t.build_prompt("Give a colour.")
    other = STOPS[name][0]
    assert t.get_response(prompt + " Blue. \n\n" + other + "\nmore") == "Blue."
    # Echo-free output (the prompt was not included): still the answer, cut at the stop.
    assert t.get_response("Green.\n" + STOPS[name][1] + " again") == "Green."


@pytest.mark.parametrize(
    "text", ["", "no marker at all", "###", "### Response", "\x00\n\t", "é" * 1000]
)
def test_get_response_never_raises(text):
    t = load_template("alpaca")
    assert t.get_response(text) == cut_at_stop(text, t.stop_strings).strip()


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a B c A d", ["A", "B"]) == "a "
    assert cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "../templates/alpaca",
        "alpaca/../alpaca",
        "/etc/passwd",
        "alpaca.txt",
        "",
        "ALPACA",
        "nope",
    ],
)
def test_bad_template_names_rejected(name):
    with pytest.raises(UsageError) as e:
        load_template(name)
    msg = str(e.value)
    assert "\n" not in msg and "--prompt_template_name" in msg


def test_traversal_to_a_json_outside_is_only_a_path_if_it_exists(tmp_path):
    with pytest.raises(UsageError, match="no such template file"):
        load_template("../../etc/passwd.json")


def _write(tmp_path, data, name="mine.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return p


def test_user_template_path_accepted(tmp_path):
    p = _write(
        tmp_path,
        {
            "description": "mine",
            "prompt_input": "Q: {instruction}\nC: {input}\nA:",
            "prompt_no_input": "Q: {instruction}\nA:",
            "response_split": "A:",
        },
    )
    t = load_template(str(p))
    assert t.build_prompt("x", "y") == "Q: x\nC: y\nA:"
    assert t.get_response("Q: x\nA: yes") == "yes"
    assert t.stop_strings == ("A:",)
    assert t.name == str(p.resolve())


@pytest.mark.parametrize(
    "data, needle",
    [
        (
            {
                "description": "d",
                "prompt_input": "{instruction}{input}",
                "prompt_no_input": "{instruction}",
            },
            "missing key(s) response_split",
        ),
        (
            {
                "description": "d",
                "prompt_input": "{instruction}{input}{context}",
                "prompt_no_input": "{instruction}",
                "response_split": "A:",
            },
            "unknown placeholder(s) {context}",
        ),
        (
            {
                "description": "d",
                "prompt_input": "{instruction}",
                "prompt_no_input": "{instruction}",
                "response_split": "A:",
            },
            "must contain {input}",
        ),
        (
            {
                "description": "d",
                "prompt_input": "{instruction}{input}",
                "prompt_no_input": "{instruction} {",
                "response_split": "A:",
            },
            "bad braces",
        ),
        (
            {
                "description": "d",
                "prompt_input": "{instruction}{input}",
                "prompt_no_input": "{instruction}",
                "response_split": "A:",
                "extra": 1,
            },
            "unknown key(s) extra",
        ),
        ([1, 2], "expected a JSON object"),
        ("{not json", "invalid JSON at line 1 column 2"),
    ],
)
def test_bad_user_templates_are_one_line_errors(tmp_path, data, needle):
    p = _write(tmp_path, data)
    with pytest.raises(UsageError) as e:
        load_template(str(p))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
