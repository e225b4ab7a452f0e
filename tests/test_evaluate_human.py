"""evaluate.py human as a rater meets it: the live page driven by gradio_client and by
headless Chromium. A scripted sequence of votes with a tie, an undo, a skip and a SIGKILL
of the server mid-way (resumed from human_votes.json); the names of the systems never
reach the client before the last vote; keyboard shortcuts work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from api_server import free_port
from conftest import ROOT
from test_ui import CHROMIUM, CHROMIUM_ARGS

MODEL, REFERENCE = "zebrasystem", "okapisystem"  # names that cannot occur by chance


def write_pairs(folder: Path, n: int) -> tuple[Path, Path]:
    rows = [{"instruction": f"Question {i}?", "dataset": "t"} for i in range(n)]
    mp, rp = folder / "m.json", folder / "r.json"
    mp.write_text(json.dumps([{**r, "output": f"model says {i}", "generator": MODEL}
                              for i, r in enumerate(rows)]))  # fmt: skip
    rp.write_text(json.dumps([{**r, "output": f"reference says {i}", "generator": REFERENCE}
                              for i, r in enumerate(rows)]))  # fmt: skip
    return mp, rp


class Page:
    def __init__(self, mp, rp, out, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.fh = open(log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "evaluate.py"), "human", "--model_outputs", str(mp),
             "--reference_outputs", str(rp), "--output_dir", str(out), "--server_port",
             str(self.port), "--seed", "3"],
            stdout=self.fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, Path(log).read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    self.index_html = r.read().decode()
                    break
            except OSError:
                assert time.monotonic() < deadline, Path(log).read_text()[-2000:]
                time.sleep(0.3)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read().decode()

    def kill(self, sig=signal.SIGKILL):
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=20)
        self.fh.close()


def hides_names(text: str) -> bool:
    return MODEL not in text and REFERENCE not in text


def test_scripted_votes_undo_kill_resume_and_names_hidden(tmp_path):
    from gradio_client import Client

    mp, rp = write_pairs(tmp_path, 4)
    out, log = tmp_path / "votes", tmp_path / "page.log"
    page = Page(mp, rp, out, log)
    try:
        assert hides_names(page.index_html) and hides_names(page.get("config"))
        client = Client(page.url, verbose=False)
        seen = [client.predict(api_name="/view")]
        assert seen[0][0] == "Pair 1 of 4 (0 voted)" and seen[0][1] == "Question 0?"
        shown = {seen[0][2], seen[0][3]}
        assert shown == {"model says 0", "reference says 0"}
        for api in ("/vote_A", "/vote_tie", "/undo", "/vote_B", "/vote_skip"):
            seen.append(client.predict(api_name=api))
        assert seen[2][0].startswith("Pair 3 of 4") and seen[3][0].startswith("Pair 2 of 4")
        assert seen[-1][0] == "Pair 4 of 4 (2 voted)" and seen[-1][1] == "Question 3?"
        assert all(hides_names(json.dumps(s)) for s in seen)
        client.close()
    finally:
        page.kill()  # SIGKILL: no chance to flush anything but what each vote wrote

    state = json.loads((out / "human_votes.json").read_text())
    assert [v["choice"] for v in state["votes"]] == ["A", "B", "skip"]
    assert state["seed"] == 3 and len(state["model_as"]) == 4
    assert not list(out.glob(".human_votes.json.*"))  # no temp litter from atomic writes

    page = Page(mp, rp, out, log)
    try:
        client = Client(page.url, verbose=False)
        resumed = client.predict(api_name="/view")
        assert resumed[0] == "Pair 4 of 4 (2 voted)" and hides_names(json.dumps(resumed))
        final = client.predict(api_name="/vote_tie")
        client.close()
    finally:
        page.kill(signal.SIGTERM)

    # Only now the names appear, with the tally computed from the recorded sides.
    model_as = state["model_as"]
    winners = ["model" if model_as[0] == "A" else "reference",
               "model" if model_as[1] == "B" else "reference"]  # fmt: skip
    wins, losses = winners.count("model"), winners.count("reference")
    tally = f"{MODEL} {wins} : {losses} {REFERENCE}, 1 ties"
    assert final[0] == "All 4 pairs done" and tally in final[4]
    results = json.loads((out / "human_results.json").read_text())
    assert results["tally"] == tally and results["skipped"] == 1
    assert results["win_rate"] == pytest.approx(100 * (wins + 0.5) / 3)
    assert 0 < results["sign_test_p"] <= 1
    assert (out / "human_tally.png").stat().st_size > 1000


@pytest.mark.browser
def test_keyboard_shortcuts_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    mp, rp = write_pairs(tmp_path, 3)
    out = tmp_path / "votes"
    page_server = Page(mp, rp, out, tmp_path / "page.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(page_server.url)
                progress = page.locator("#progress")
                expect(progress).to_contain_text("Pair 1 of 3")
                a_text = page.locator("#answer_a textarea").input_value()
                page.locator("body").click(position={"x": 5, "y": 5})
                for key, expected in (("a", "Pair 2 of 3"), ("t", "Pair 3 of 3"),
                                      ("u", "Pair 2 of 3"), ("b", "Pair 3 of 3")):  # fmt: skip
                    page.keyboard.press(key)
                    expect(progress).to_contain_text(expected)
                    assert hides_names(page.content())
                page.keyboard.press("s")
                expect(page.locator("#final")).to_contain_text(f"{REFERENCE}, 0 ties")
                expect(page.locator("#final")).to_contain_text("sign test p =")
            finally:
                browser.close()
    finally:
        page_server.kill(signal.SIGTERM)
    votes = json.loads((out / "human_votes.json").read_text())["votes"]
    assert [v["choice"] for v in votes] == ["A", "B", "skip"]
    model_as = json.loads((out / "human_votes.json").read_text())["model_as"]
    assert (votes[0]["winner"] == "model") == (model_as[0] == "A")
    assert a_text in ("model says 0", "reference says 0")
