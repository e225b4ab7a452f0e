"""The evaluate command: a click group whose subcommands are answers, human and judge, each
built from its config dataclass (fields = flags) like the other commands."""

import click

from lora_alpaca import cli
from lora_alpaca.evaluate import answers, human, judge

HELP = """Judge a fine-tune the way Alpaca was judged: blind pairwise comparison by people and by a
judge model, with win rates, in AlpacaEval's file format.

\b
python evaluate.py answers --eval_set user_oriented_instructions.jsonl --lora_weights out/quickstart --output_file adapter.json
python evaluate.py human --model_outputs adapter.json --reference_outputs base.json --output_dir eval/
python evaluate.py judge --model_outputs adapter.json --reference_outputs base.json --output_dir eval/ --api_base http://127.0.0.1:8000/v1 --judge_model NAME
"""

SUBCOMMANDS = {
    "answers": (answers.AnswersConfig, answers.main, "Answer an evaluation set with one system (AlpacaEval model_outputs.json)."),
    "human": (human.HumanConfig, human.main, "Blind pairwise comparison in the browser: votes, tally, sign test, chart."),
    "judge": (judge.JudgeConfig, judge.main, "Pairwise comparison by a judge model: win rate, SE, discrete and length-controlled rates, report."),
}  # fmt: skip


def build_group(name: str = "evaluate.py") -> click.Group:
    group = click.Group(
        name=name, help=HELP, context_settings={"help_option_names": ["-h", "--help"]}
    )
    for sub, (config, main, text) in SUBCOMMANDS.items():
        command = cli.build_command(config, main, help=text)
        command.name = sub
        group.add_command(command)
    return group


def console_main() -> None:
    """The `lora-alpaca-evaluate` console command (same subcommands as evaluate.py)."""
    cli.run(build_group("lora-alpaca-evaluate"))
