"""Conversation data (ShareGPT and OpenAI-style messages): detect, validate by row and turn,
encode with exact per-turn masking (lora_alpaca.chat_template), fit whole turns to
`cutoff_len`, and audit.

ShareGPT rows: {"conversations": [{"from": "system|human|gpt|user|assistant", "value": ...}]}
messages rows: {"messages": [{"role": "system|user|assistant", "content": ...}]}

Every problem of every row is reported in one error line ("row 3 turn 2: ..."), with the
same --empty_outputs / --duplicates policies as Alpaca rows (an empty *assistant* turn is
the "empty output"). Over-long conversations keep whole turns: under --overlength truncate
the oldest exchanges after the system prompt are dropped until the rest fits (a
conversation whose last exchange alone is too long is dropped and counted); drop and
error act on the whole conversation.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lora_alpaca.chat_template import IGNORE_INDEX, ChatRenderer, TemplateRenderError
from lora_alpaca.data.audit import Audit, learned_segments
from lora_alpaca.data.sources import SourceFile
from lora_alpaca.data.validation import Problems, RowPolicy
from lora_alpaca.errors import UsageError

FORMATS = ("alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# format -> (list key, role key, content key, role map)
LAYOUT = {
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES),
    "messages": ("messages", "role", "content", MESSAGES_ROLES),
}


def detect_format(sources: list[SourceFile]) -> str:
    """sharegpt / messages / alpaca from the first object row that has one of the keys."""
    for s in sources:
        for rec in s.records[:100]:
            if isinstance(rec, dict):
                for fmt, (key, *_rest) in LAYOUT.items():
                    if isinstance(rec.get(key), list):
                        return fmt
                return "alpaca"
    return "alpaca"


def _special_texts(tokenizer) -> list[str]:
    return [t for t in tokenizer.all_special_tokens if t]


def parse_row(rec: Any, fmt: str, specials: list[str]) -> tuple[list[dict] | None, list[tuple]]:
    """(messages, problems) for one row; problems are (turn or None, kind, message)."""
    key, role_key, content_key, roles = LAYOUT[fmt]
    if not isinstance(rec, dict):
        return None, [
            (None, "not an object", f"expected an object with {key!r}, got {type(rec).__name__}")
        ]
    turns = rec.get(key)
    if not isinstance(turns, list):
        what = "missing" if key not in rec else f"{type(turns).__name__}, expected a list"
        return None, [(None, f"missing {key!r}", f"{key!r} is {what}")]
    if not turns:
        return None, [(None, "empty conversation", f"{key!r} is an empty list")]
    out, problems = [], []
    for t, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            problems.append(
                (t, "bad turn", f"expected an object with {role_key!r} and {content_key!r}")
            )
            continue
        role = turn.get(role_key)
        if role not in roles:
            problems.append(
                (t, "unknown role", f"unknown role {role!r}; allowed: {', '.join(roles)}")
            )
            continue
        content = turn.get(content_key)
        if not isinstance(content, str):
            problems.append(
                (
                    t,
                    "not a string",
                    f"{content_key!r} is {type(content).__name__}, expected a string",
                )
            )
            continue
        role = roles[role]
        if role == "system" and t != 1:
            problems.append(
                (t, "misplaced system", "a system message is allowed only as the first turn")
            )
            continue
        if not content.strip() and role != "assistant":
            problems.append((t, "empty content", f"empty {role} content"))
            continue
        hit = next((s for s in specials if s in content), None)
        if hit:
            problems.append(
                (
                    t,
                    "special token text",
                    f"content contains the special token text {hit!r} (it would become a real control token)",
                )
            )
            continue
        out.append({"role": role, "content": content})
    if problems:
        return None, problems
    if out[-1]["role"] != "assistant":
        return None, [
            (
                len(turns),
                "no final assistant turn",
                "the conversation ends without an assistant turn",
            )
        ]
    return out, []


def _render_problem(renderer: ChatRenderer, msgs: list[dict]) -> tuple[int, str] | None:
    """(turn, why) when the template cannot render this conversation."""
    for t in range(1, len(msgs)):
        if msgs[t]["role"] == msgs[t - 1]["role"] and msgs[t]["role"] in ("user", "assistant"):
            try:
                renderer.render(msgs[: t + 1], add_generation_prompt=False)
            except TemplateRenderError:
                return (
                    t + 1,
                    f"two {msgs[t]['role']} turns in a row, which the chat template cannot render (merge them)",
                )
    try:
        renderer.render(msgs, add_generation_prompt=False)
    except TemplateRenderError as e:
        return len(msgs), f"the chat template cannot render this conversation: {e}"
    return None


def _drop_oldest_exchange(msgs: list[dict]) -> list[dict] | None:
    """The conversation without its oldest exchange (system kept), None if one is left."""
    head = msgs[:1] if msgs[0]["role"] == "system" else []
    rest = msgs[len(head) :]
    users = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
    # The next exchange starts at the first user turn after an assistant turn.
    nxt = next((i for i in users if rest[i - 1]["role"] == "assistant"), None)
    return None if nxt is None else head + rest[nxt:]


def _arrow(rows_ids: list[list[int]], rows_labels: list[list[int]], index: list[int]) -> dict:
    import pyarrow as pa

    return {
        "input_ids": pa.array(rows_ids, type=pa.list_(pa.int32())),
        "labels": pa.array(rows_labels, type=pa.list_(pa.int32())),
        "length": pa.array([len(x) for x in rows_ids], type=pa.int32()),
        "row": pa.array(index, type=pa.int64()),
    }


def _role_tokens(renderer: ChatRenderer, msgs, ids, labels, stats: dict) -> None:
    """Add this conversation's tokens and learned tokens per role to `stats`, by token ids:
    a message's content counts for its role; what the template writes around it (headers,
    end-of-turn markers, a default system prompt it injects) counts as "template".

    Message i spans the ids its rendering adds to the prefix before it; the same prefix plus
    message i with empty content gives the template's part (header ids match the full ids
    up to where the content starts, the rest are the closing ids). A template that renders
    an empty message differently (drops it, raises) leaves the whole span to the role."""
    from lora_alpaca.chat_template import _common_prefix

    def ids_of(convs):
        texts = []
        for c in convs:
            try:
                texts.append(renderer.render(c, add_generation_prompt=False))
            except TemplateRenderError:
                texts.append(None)
        got = renderer._ids([t or "" for t in texts])
        return [g if t is not None else None for g, t in zip(got, texts, strict=True)]

    n = len(msgs)
    through = ids_of([msgs[: i + 1] for i in range(n)])
    empty = ids_of([[*msgs[:i], {**msgs[i], "content": ""}] for i in range(n)])
    start = 0
    for i, m in enumerate(msgs):
        end = (
            len(ids)
            if i == n - 1 or through[i] is None
            else max(min(len(ids), len(through[i])), start)
        )
        head_end, tail_start = start, end  # fallback: the whole span is the role's
        e = empty[i]
        if e is not None and len(e) >= start:
            cut = _common_prefix(e, ids)
            closing = len(e) - cut
            if start <= cut <= end - closing:
                head_end, tail_start = cut, end - closing
        for role, a, b in (("template", start, head_end), (m["role"], head_end, tail_start),
                           ("template", tail_start, end)):  # fmt: skip
            st = stats.setdefault(role, [0, 0])
            st[0] += b - a
            st[1] += sum(1 for lab in labels[a:b] if lab != IGNORE_INDEX)
        start = end


def build_conversations(opts, renderer: ChatRenderer, fmt: str, source_name: str, sources):
    """Validate + encode + split + audit conversation rows -> (tables, audit)."""
    from lora_alpaca.data.pipeline import keep_and_split

    rows_read = sum(len(s.records) for s in sources)
    if rows_read == 0:
        raise UsageError(f"{source_name}: no rows (expected {fmt} conversations)")
    specials = _special_texts(renderer.tokenizer)
    problems = Problems(source_name)
    prefix = len(sources) > 1
    convs, index, positions = [], [], []
    skipped = {"empty output": 0, "duplicate": 0, "over --cutoff_len": 0}
    policy = RowPolicy(opts, problems, skipped)
    g = -1
    for s in sources:
        for i, rec in enumerate(s.records):
            g += 1
            pos = f"{s.name} {s.position(i)}" if prefix else s.position(i)
            msgs, bad = parse_row(rec, fmt, specials)
            for turn, kind, msg in bad:
                problems.add(f"{pos} turn {turn}" if turn else pos, kind, msg)
            if msgs is None:
                continue
            empty = next((t for t, m in enumerate(msgs, 1) if not m["content"].strip()), None)
            if empty:
                policy.empty_output(
                    f"{pos} turn {empty}",
                    "empty assistant content",
                    "--empty_outputs skip drops conversations with an empty assistant turn",
                )
                continue
            why = _render_problem(renderer, msgs)
            if why:
                problems.add(f"{pos} turn {why[0]}", "cannot render", why[1])
                continue
            if policy.is_duplicate(json.dumps(msgs, ensure_ascii=False), pos):
                continue
            convs.append(msgs)
            index.append(g)
            positions.append(pos)
    problems.raise_if_any()

    kept, ids_out, labels_out, full_len, trunc, turns_n = [], [], [], [], [], []
    role_stats: dict[str, list[int]] = {}
    for k, msgs in enumerate(convs):
        try:
            r = renderer.rendered(msgs)
        except TemplateRenderError as e:
            problems.add(
                positions[k],
                "cannot mask",
                str(e),
                "use --chat_template alpaca or your own .jinja file",
            )
            continue
        full = len(r.ids)
        cut = False
        while len(r.ids) > opts.cutoff_len and opts.overlength == "truncate":
            shorter = _drop_oldest_exchange(msgs)
            if shorter is None:
                break
            msgs, cut = shorter, True
            r = renderer.rendered(msgs)
        if len(r.ids) > opts.cutoff_len:
            if opts.overlength == "error":
                problems.add(
                    positions[k],
                    "too long",
                    f"{full} tokens, more than --cutoff_len {opts.cutoff_len}",
                    "--overlength truncate drops the oldest turns, --overlength drop skips the conversation",
                )
            else:
                skipped["over --cutoff_len"] += 1
            continue
        from lora_alpaca.chat_template import labels_for

        labels = labels_for(r, opts.train_on_turns, opts.train_on_inputs)
        kept.append(k)
        ids_out.append(r.ids)
        labels_out.append(labels)
        full_len.append(full)
        trunc.append(cut)
        turns_n.append(len(msgs))
        _role_tokens(renderer, msgs, r.ids, labels, role_stats)
    problems.raise_if_any()
    audit = Audit(
        source=source_name,
        template=f"chat template {renderer.spec} ({fmt} data)",
        cutoff_len=opts.cutoff_len,
        train_on_inputs=opts.train_on_inputs,
        add_eos_token=True,
        overlength=opts.overlength,
        rows_read=rows_read,
        seed=opts.seed,
    )
    lengths = np.array([len(x) for x in ids_out], dtype=np.int64)
    supervised = np.array(
        [sum(1 for v in lab if v != IGNORE_INDEX) for lab in labels_out], dtype=np.int64
    )
    keep, train_idx, val_idx = keep_and_split(
        audit,
        opts,
        skipped,
        np.arange(len(kept)),
        full_lengths=np.asarray(full_len),
        lengths=lengths,
        supervised=supervised,
        truncated=np.asarray(trunc),
        positions=[positions[k] for k in kept],
        noun="conversations",
    )
    turns_arr = np.asarray(turns_n)[keep]
    audit.conversation = {
        "format": fmt,
        "chat_template": renderer.spec,
        "train_on_turns": opts.train_on_turns,
        "turns_per_conversation": {
            "min": int(turns_arr.min()),
            "mean": round(float(turns_arr.mean()), 2),
            "max": int(turns_arr.max()),
        },
        "learned_share_by_role": {
            role: [tok, learned] for role, (tok, learned) in sorted(role_stats.items())
        },
    }
    tables = {}
    for name, sel in (("train", train_idx), ("val", val_idx)):
        rows = [keep[j] for j in sel]
        tables[name] = (
            _arrow(
                [ids_out[j] for j in rows],
                [labels_out[j] for j in rows],
                [index[kept[j]] for j in rows],
            )
            if rows
            else None
        )
    # Show the first multi-turn training conversation (or the first one) with its learned spans.
    pick = next(
        (j for j in train_idx if turns_n[keep[j]] > 2), train_idx[0] if len(train_idx) else None
    )
    if pick is not None:
        j = keep[pick]
        audit.examples.append(
            {
                "position": positions[kept[j]],
                "segments": learned_segments(ids_out[j], labels_out[j], renderer.tokenizer),
            }
        )
    return tables, audit


def conversation_lines(audit: Audit) -> list[str]:
    """Extra audit lines for conversation data."""
    c = audit.conversation
    if not c:
        return []
    t = c["turns_per_conversation"]
    roles = ", ".join(
        f"{role} {learned:,}/{tok:,} ({100 * learned / tok if tok else 0:.1f}%)"
        for role, (tok, learned) in c["learned_share_by_role"].items()
    )
    return [
        f"  conversations: {c['format']} rows, chat template {c['chat_template']}, --train_on_turns {c['train_on_turns']}",
        f"  turns per conversation: min {t['min']}, mean {t['mean']}, max {t['max']}; "
        f"conversations with oldest turns dropped to fit: {audit.truncated_rows:,}",
        f"  learned tokens by role (learned/all; template = headers, end-of-turn tokens and "
        f"any default system prompt the chat template writes): {roles}",
    ]
