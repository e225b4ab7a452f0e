"""`evaluate.py human`: a blind pairwise comparison page (Gradio) for one rater.

One prompt and two answers at a time; which system is (A) is drawn per prompt from the
recorded seed; votes A / B / tie, skip and undo, with keyboard shortcuts (a, b, t, s, u).
Every vote rewrites human_votes.json atomically, so a closed tab or a killed server
resumes where it stopped. System names live only on the server until the last pair is
voted: the page's values (prompt, answers, progress) never carry them; then the tally in
the paper's form, the sign test and a bar chart (human_tally.png) appear.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from lora_alpaca import cli
from lora_alpaca.errors import UsageError
from lora_alpaca.evaluate.judge_prompt import is_swapped
from lora_alpaca.evaluate.sets import check_output_dir, pair_outputs, read_model_outputs
from lora_alpaca.evaluate.stats import sign_test_p, tally_line, win_rates
from lora_alpaca.log import log

F = cli.field
VOTES = "human_votes.json"
RESULTS = "human_results.json"
CHART = "human_tally.png"
CHOICES = ("A", "B", "tie", "skip")
SHORTCUTS = {"a": "vote_a", "b": "vote_b", "t": "vote_tie", "s": "skip", "u": "undo"}


@dataclass
class HumanConfig:
    model_outputs: str = F("", "Answers of the system evaluated (AlpacaEval JSON).")
    reference_outputs: str = F("", "Answers it is compared with, e.g. the base (AlpacaEval JSON).")
    output_dir: str = F("", "Folder for human_votes.json (resumed if present), tally and chart.")
    server_name: str = F("127.0.0.1", "Address the page listens on.")
    server_port: int = F(7861, "Port of the page.")
    seed: int = F(
        0, "Seed of which system is shown as (A), per prompt (recorded in the votes file)."
    )
    limit: int = F(0, "Compare only the first N pairs (0 = all).")
    export_preferences: str | None = F(
        None, "When every pair is voted, also write {prompt, chosen, rejected} JSONL."
    )


def read_votes(out_dir: Path) -> dict | None:
    p = Path(out_dir) / VOTES
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"--output_dir {out_dir}: {VOTES} is not valid JSON") from None


def fingerprint(pairs: list[dict]) -> str:
    blob = json.dumps([[p["instruction"], p["model_output"], p["reference_output"]] for p in pairs])
    return hashlib.sha256(blob.encode()).hexdigest()


def winner_of(choice: str, model_as: str) -> str | None:
    if choice == "tie":
        return "tie"
    if choice == "skip":
        return None
    return "model" if choice == model_as else "reference"


def tally(state: dict) -> dict:
    winners = [v["winner"] for v in state["votes"] if v["winner"]]
    wins, losses, ties = (winners.count(w) for w in ("model", "reference", "tie"))
    prefs = [{"model": 1.0, "reference": 0.0, "tie": 0.5}[w] for w in winners]
    return {
        "model": state["model"],
        "reference": state["reference"],
        "tally": tally_line(state["model"], wins, state["reference"], losses, ties),
        "model_wins": wins,
        "reference_wins": losses,
        "ties": ties,
        "skipped": sum(v["choice"] == "skip" for v in state["votes"]),
        "sign_test_p": sign_test_p(wins, losses),
        **win_rates(prefs),
    }


class Session:
    """The rater's progress, held in human_votes.json (the single source of truth)."""

    def __init__(
        self, out_dir: Path, pairs: list[dict], model: str, reference: str, seed: int,
        export_path: str | None = None,
    ):  # fmt: skip
        self.out_dir, self.pairs, self.lock = out_dir, pairs, threading.Lock()
        self.export_path = export_path
        state = read_votes(out_dir)
        if state is None:
            state = {
                "model": model,
                "reference": reference,
                "seed": seed,
                "fingerprint": fingerprint(pairs),
                "model_as": [("A" if is_swapped(p["instruction"], seed) else "B") for p in pairs],
                "votes": [],
            }
        elif state.get("fingerprint") != fingerprint(pairs):
            raise UsageError(
                f"--output_dir {out_dir}: {VOTES} holds votes on other answers; "
                "use a new --output_dir for these files"
            )
        self.state = state
        self._save()

    def _save(self) -> None:
        from lora_alpaca.fileio import write_text_atomic

        text = json.dumps(self.state, indent=1, ensure_ascii=False) + "\n"
        write_text_atomic(self.out_dir / VOTES, text)

    def current(self) -> int | None:
        done = {v["index"] for v in self.state["votes"]}
        return next((i for i in range(len(self.pairs)) if i not in done), None)

    def vote(self, choice: str) -> None:
        with self.lock:
            i = self.current()
            if i is None:
                return
            model_as = self.state["model_as"][i]
            self.state["votes"].append(
                {"index": i, "choice": choice, "winner": winner_of(choice, model_as)}
            )
            self._save()
            if self.current() is None:
                self._finish()

    def undo(self) -> None:
        with self.lock:
            if self.state["votes"]:
                self.state["votes"].pop()
                self._save()

    def _finish(self) -> None:
        from lora_alpaca.evaluate.report import tally_chart
        from lora_alpaca.fileio import write_json_atomic

        result = tally(self.state)
        write_json_atomic(self.out_dir / RESULTS, result)
        tally_chart(result, self.out_dir / CHART)
        if self.export_path:
            from lora_alpaca.evaluate.preferences import export_preferences

            export_preferences(self.export_path, self.pairs, None, self.state)

    def view(self) -> tuple:
        """Values sent to the page. Names appear only once every pair is voted."""
        with self.lock:
            n, i = len(self.pairs), self.current()
            voted = sum(v["choice"] != "skip" for v in self.state["votes"])
            if i is None:
                t = tally(self.state)
                md = (
                    f"### Done: {t['tally']}\n\nTwo-sided sign test p = {t['sign_test_p']:.3g} "
                    f"({t['skipped']} skipped). (A)/(B) were drawn per prompt with seed "
                    f"{self.state['seed']}; results in {RESULTS}."
                )
                return (f"All {n} pairs done", "", "", "", md, str(self.out_dir / CHART))
            pair = self.pairs[i]
            a, b = pair["model_output"], pair["reference_output"]
            if self.state["model_as"][i] == "B":
                a, b = b, a
            progress = f"Pair {len(self.state['votes']) + 1} of {n} ({voted} voted)"
            return (progress, pair["instruction"], a, b, "", None)


def keyboard_script() -> str:
    keys = json.dumps(SHORTCUTS)
    return f"""<script>
document.addEventListener('keydown', (e) => {{
  const t = e.target;
  if (e.ctrlKey || e.metaKey || e.altKey || (t && (t.isContentEditable ||
      ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName) && !t.readOnly))) return;
  const id = ({keys})[e.key.toLowerCase()];
  const el = id && document.getElementById(id);
  if (el) {{ e.preventDefault(); el.click(); }}
}});
</script>"""


def build_page(session: Session):
    import gradio as gr

    with gr.Blocks(title="Blind comparison") as page:
        gr.Markdown(
            "## Which answer is better?\nKeys: **a** = A, **b** = B, **t** = tie, **s** = skip, **u** = undo."
        )
        progress = gr.Markdown(elem_id="progress")
        prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="prompt", lines=3)
        with gr.Row():
            answer_a = gr.Textbox(
                label="Answer (A)", interactive=False, elem_id="answer_a", lines=10
            )
            answer_b = gr.Textbox(
                label="Answer (B)", interactive=False, elem_id="answer_b", lines=10
            )
        with gr.Row():
            buttons = {
                "A": gr.Button("A is better [a]", elem_id="vote_a"),
                "tie": gr.Button("Tie [t]", elem_id="vote_tie"),
                "B": gr.Button("B is better [b]", elem_id="vote_b"),
                "skip": gr.Button("Skip [s]", elem_id="skip"),
            }
            undo = gr.Button("Undo [u]", elem_id="undo")
        final = gr.Markdown(elem_id="final")
        chart = gr.Image(label="Tally", type="filepath", elem_id="chart", interactive=False)
        outputs = [progress, prompt, answer_a, answer_b, final, chart]

        for choice, button in buttons.items():

            def cast(choice=choice):
                session.vote(choice)
                return session.view()

            button.click(cast, None, outputs, api_name=f"vote_{choice}", concurrency_limit=1)
        undo.click(lambda: (session.undo(), session.view())[1], None, outputs, api_name="undo")
        page.load(session.view, None, outputs, api_name="view")
    return page


def main(cfg: HumanConfig) -> int:
    for flag in ("model_outputs", "reference_outputs", "output_dir"):
        if not getattr(cfg, flag):
            raise UsageError(f"--{flag} is required")
    if not 0 <= cfg.server_port <= 65535:
        raise UsageError(f"--server_port {cfg.server_port}: must be 0-65535")
    if cfg.limit < 0:
        raise UsageError(f"--limit {cfg.limit}: must be >= 0")
    if cfg.export_preferences:
        from lora_alpaca.evaluate.preferences import check_export_path

        check_export_path(cfg.export_preferences)
    out_dir = check_output_dir(cfg.output_dir)
    model_rows = read_model_outputs(cfg.model_outputs, "--model_outputs")
    reference_rows = read_model_outputs(cfg.reference_outputs, "--reference_outputs")
    pairs = pair_outputs(model_rows, reference_rows)
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    out_dir.mkdir(exist_ok=True)
    session = Session(
        out_dir, pairs, model_rows[0]["generator"], reference_rows[0]["generator"], cfg.seed,
        cfg.export_preferences,
    )  # fmt: skip
    page = build_page(session)
    log(f"{len(pairs)} pairs, votes in {out_dir / VOTES}", tag="evaluate")
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=cfg.server_name,
        server_port=cfg.server_port,
        head=keyboard_script(),
        show_error=False,
        inbrowser=False,
    )
    return 0
