"""The sampler as a user and as clients meet it: generate.py started on a free port with the
real SmolLM2 and an adapter, driven by headless Chromium and by 16 concurrent API clients.

Set LORA_ALPACA_SCREENSHOT=1 to refresh docs/sampler.png from the browser test.
"""

from __future__ import annotations

import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from adapters import make_adapter
from conftest import ROOT
from sampler_page import sampler_page

from lora_alpaca.generate.ui import ServerLimits, exposure_warning, make_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN_CAP = 48


def non_loopback_ipv4() -> str | None:
    """This machine's address on its default route (a UDP connect sends no packet)."""
    candidates = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    return next((ip for ip in candidates if not ip.startswith("127.")), None)


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    """generate.py with default binding, an adapter on SmolLM2, a small token cap."""
    adapter = make_adapter(smollm2, tmp_path_factory.mktemp("ui") / "adapter", scale=0.02)
    log = tmp_path_factory.mktemp("ui-log") / "server.log"
    with sampler_page(
        "--lora_weights", adapter, "--max_new_tokens", "40",
        "--max_new_tokens_limit", TOKEN_CAP, "--max_input_chars", "500",
        "--concurrency_limit", "2", log=log,
    ) as page:  # fmt: skip
        yield page


@pytest.mark.slow
@pytest.mark.browser
def test_browser_sees_streamed_answer(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(server["url"])
            generate = page.locator("#generate")
            expect(generate).to_be_visible()
            status = page.locator("#status")

            # Empty instruction: a clear message, nothing generated.
            generate.click()
            expect(status).to_contain_text("Please type an instruction")

            # Controls follow the decoding mode.
            expect(page.get_by_text("Temperature")).to_be_hidden()
            page.locator("#mode").get_by_text("sample", exact=True).click()
            expect(page.get_by_text("Temperature")).to_be_visible()
            page.locator("#mode").get_by_text("greedy", exact=True).click()
            expect(page.get_by_text("Temperature")).to_be_hidden()

            page.locator("#instruction textarea").fill("Give three tips for staying healthy.")
            page.locator("#compare input").check()
            expect(page.locator("#base_output")).to_be_visible()
            # Record every distinct value the output box takes while the answer streams in.
            page.evaluate(
                """() => {
                    window.__seen = [];
                    const box = document.querySelector('#output textarea');
                    window.__poll = setInterval(() => {
                        const v = box.value;
                        if (v && window.__seen[window.__seen.length - 1] !== v) window.__seen.push(v);
                    }, 10);
                }"""
            )
            generate.click()
            expect(status).to_contain_text("ended by", timeout=240_000)
            expect(page.locator("#base_output textarea")).not_to_have_value("")
            seen = page.evaluate("() => { clearInterval(window.__poll); return window.__seen; }")
            final = page.locator("#output textarea").input_value()
            assert final.strip()
            assert len(seen) > 1, f"answer arrived in one piece: {seen}"
            assert seen[-1] == final
            assert all(final.startswith(s.rstrip()) for s in seen)  # it grew, never rewritten
            assert "### Instruction" not in final
            shot = tmp_path / "sampler.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("LORA_ALPACA_SCREENSHOT") == "1":
                shutil.copy(shot, ROOT / "docs" / "sampler.png")
        finally:
            browser.close()


@pytest.mark.slow
def test_sixteen_concurrent_clients(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)

    def ask(i: int):
        return client.predict(
            f"Name a fruit that starts with the letter {'ABCDEFGHIJKLMNOP'[i]}.", "", "sample",
            0.8, 0.9, 40, 4, 1.1, 8, i, False, api_name="/generate",
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(ask, range(16)))
    assert len(results) == 16
    for answer, base, status in results:
        assert "ended by" in status, status
        assert answer.strip() and base == ""
    assert len({r[0] for r in results}) > 1  # 16 different prompts and seeds, not one cached reply


@pytest.mark.slow
def test_limits_are_enforced_server_side(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    args = ("greedy", 0.7, 0.9, 40, 4, 1.0)
    too_long = client.predict("x" * 501, "", *args, 8, 0, False, api_name="/generate")
    assert "too long" in too_long[2] and too_long[0] == ""
    empty = client.predict("   ", "", *args, 8, 0, False, api_name="/generate")
    assert "Please type an instruction" in empty[2]
    # A client asking for more tokens than the cap is refused (gradio checks the slider's
    # maximum on the server), and respond() clamps anything that reaches it anyway.
    with pytest.raises(AppError, match="maximum"):
        client.predict("Write a story.", "", *args, 100000, 0, False, api_name="/generate")
    assert (
        make_settings(*args, 100000, 0, ServerLimits(max_new_tokens=TOKEN_CAP)).max_new_tokens
        == TOKEN_CAP
    )
    answer, _, status = client.predict(
        "Write a very long story about a dragon.",
        "",
        *args,
        TOKEN_CAP,
        0,
        False,
        api_name="/generate",
    )
    n = int(status.split(" after ")[1].split()[0])
    assert answer and 1 <= n <= TOKEN_CAP, status


def test_not_reachable_beyond_loopback_by_default(server):
    ip = non_loopback_ipv4()
    assert ip, "this machine has no non-loopback IPv4 address to test against"
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=5):
        pass  # positive control: the server is up on loopback
    with socket.socket() as listener:  # control: this address does accept local connections
        listener.bind((ip, 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=5):
            pass
    with pytest.raises(ConnectionRefusedError):
        with socket.create_connection((ip, server["port"]), timeout=5):
            pass
    log = Path(server["log"]).read_text()
    assert "127.0.0.1" in log and "WARNING" not in log and "gradio.live" not in log


def test_exposure_warnings():
    assert exposure_warning("127.0.0.1", False) is None
    assert "0.0.0.0" in exposure_warning("0.0.0.0", False)
    assert "gradio.live" in exposure_warning("127.0.0.1", True)


@pytest.mark.slow
@pytest.mark.browser
def test_browser_chat_three_turns(server):
    """The Chat page: three turns with a system prompt, each answer streamed into the chat,
    regenerate replaces the last answer, base model side by side, clear empties it."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(server["url"])
            page.get_by_role("tab", name="Chat").click()
            status = page.locator("#chat_status")
            page.locator("#chat_system textarea").fill("Answer briefly.")
            # gradio nests a few .message elements per chat message: count per exchange.
            bubbles = page.locator("#chat .message")
            per_exchange = 0
            for turn, text in enumerate(["Hello!", "Name a colour.", "Thanks, goodbye."], 1):
                page.locator("#chat_input textarea").fill(text)
                page.locator("#chat_send").click()
                expect(status).to_contain_text(f"turn {turn}: ended by", timeout=240_000)
                if turn == 1:
                    expect(bubbles).not_to_have_count(0)
                    per_exchange = bubbles.count()
                expect(bubbles).to_have_count(per_exchange * turn, timeout=60_000)
                expect(page.locator("#chat")).to_contain_text(text)
            page.locator("#chat_compare input").check()
            page.locator("#chat_regenerate").click()
            expect(status).to_contain_text("base model answered", timeout=240_000)
            expect(bubbles).to_have_count(per_exchange * 3)
            expect(page.locator("#base_chat .message")).to_have_count(per_exchange * 3)
            page.locator("#chat_clear").click()
            expect(bubbles).to_have_count(0)
        finally:
            browser.close()
