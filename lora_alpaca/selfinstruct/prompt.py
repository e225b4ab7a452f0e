"""The request sent to the teacher: rules, then a numbered list of example tasks that the
teacher continues up to task 20.

The wording is this project's own; the structure and the requirements are those of
Stanford Alpaca's prompt.txt (20 diverse tasks, varied verbs and phrasing, doable by a
text-only model, English, one or two sentences, realistic inputs under 100 words or
`<noinput>`, outputs under 100 words), so the answers parse the same way.
"""

from __future__ import annotations

import re

TASKS_PER_REQUEST = 20
NO_INPUT = "<noinput>"
# Stop once the teacher starts task 20 (Stanford's stop list; the 19th task is then whole).
STOP = [f"\n{TASKS_PER_REQUEST}", f"{TASKS_PER_REQUEST}."]

RULES = f"""\
We are putting together a varied collection of {TASKS_PER_REQUEST} task instructions. Each \
task will later be given to a language model, and we will judge how well the model \
carries it out.

The tasks must follow these rules:
1. Vary the verbs: avoid starting two instructions with the same verb, so that the \
collection stays diverse.
2. Vary the phrasing as well: mix direct commands with questions.
3. Vary the kind of task: open-ended writing, classification, rewriting and editing, \
brainstorming, question answering, extraction, reasoning, and so on.
4. A language model that only reads and writes text must be able to do the task. Do not \
ask for anything to be seen or heard (pictures, sound), and do not ask for an action in \
the world, such as setting an alarm or sending a message later.
5. Write the instructions in English.
6. Keep each instruction to one or two sentences: a command or a question.
7. When a task needs an input, write a concrete and realistic one, never a placeholder \
such as "<text here>". It should give the task some substance, ideally in fewer than \
100 words.
8. Many tasks need no input, for example a general question such as "Which river is the \
longest in Africa?". For those, write "{NO_INPUT}" as the input.
9. The output must be a fitting answer to the instruction and its input, in fewer than \
100 words.

List of {TASKS_PER_REQUEST} tasks:
"""


def encode_prompt(examples: list[dict]) -> str:
    """The rules, the example tasks numbered 1..k, and the opening of task k+1."""
    parts = [RULES]
    for number, task in enumerate(examples, start=1):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        task_input = task["input"].strip() or NO_INPUT
        parts.append(
            f"###\n{number}. Instruction: {instruction}\n"
            f"{number}. Input:\n{task_input}\n"
            f"{number}. Output:\n{task['output'].strip()}\n"
        )
    parts.append(f"###\n{len(examples) + 1}. Instruction:")
    return "".join(parts)
