"""generate_instruction.py's loop: Stanford's generate_instruction_following_data, resumable.

Each round samples `--num_prompt_instructions` seed tasks per request (seed tasks only, as
Stanford did), sends `--request_batch_size` requests, parses and filters the answers, and
keeps a task only if its ROUGE-L to every seed and kept instruction is at most the
threshold; then the state is saved. Everything random comes from one RNG whose state is
saved with the round, so a resumed run makes exactly the requests the killed one would have.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.log import log
from lora_alpaca.selfinstruct.config import SelfInstructConfig, check_flags, recipe_of
from lora_alpaca.selfinstruct.dedupe import RougeIndex
from lora_alpaca.selfinstruct.parse import parse_answer
from lora_alpaca.selfinstruct.prompt import encode_prompt
from lora_alpaca.selfinstruct.report import write_report
from lora_alpaca.selfinstruct.seeds import load_seed_tasks, tasks_fingerprint
from lora_alpaca.selfinstruct.state import (
    ALPACA_NAME,
    REGEN_NAME,
    SAMPLES_PER_REASON,
    check_resumable,
    load_state,
    new_state,
    rng_from_json,
    rng_state_to_json,
    save_round,
    write_outputs,
)

TAG = "generate_instruction"


class TeacherStalled(UsageError):
    """Too many rounds in a row kept nothing (one line, like every other user-facing stop)."""


def _open_state(cfg: SelfInstructConfig, out: Path, seeds: list[dict]) -> dict:
    recipe, sha = recipe_of(cfg), tasks_fingerprint(seeds)
    if cfg.resume:
        if not out.is_dir():
            raise UsageError(f"--resume: --output_dir {out} does not exist (nothing to resume)")
        state = load_state(out)
        check_resumable(state, recipe, sha, out)
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"--output_dir {out}: exists and is not empty; pass --resume to continue it, or choose another folder"
        )
    return new_state(recipe, sha, random.Random(cfg.seed))


class Progress:
    """tqdm bar of kept tasks, with the rejected count and the reason mix."""

    def __init__(self, total: int, state: dict):
        from tqdm import tqdm

        self.state = state
        self.bar = tqdm(
            total=total,
            initial=min(len(state["kept"]), total),
            desc="kept",
            unit="task",
            file=sys.stderr,
            mininterval=1.0,
        )
        self.refresh()

    def refresh(self) -> None:
        rejected = self.state["rejected"]
        mix = ", ".join(f"{r} {c}" for r, c in sorted(rejected.items(), key=lambda kv: -kv[1])[:4])
        self.bar.set_postfix_str(
            f"rejected {sum(rejected.values())}" + (f" ({mix})" if mix else "")
        )

    def set(self, kept: int) -> None:
        self.bar.update(min(kept, self.bar.total) - self.bar.n)
        self.refresh()

    def close(self) -> None:
        self.bar.close()


def _reject(state: dict, reason: str, text: str) -> None:
    state["rejected"][reason] = state["rejected"].get(reason, 0) + 1
    samples = state["rejected_samples"].setdefault(reason, [])
    if len(samples) < SAMPLES_PER_REASON:
        samples.append(text)


def run_round(cfg, state: dict, seeds: list[dict], index: RougeIndex, teacher) -> None:
    rng = rng_from_json(state["rng_state"])
    prompts, request_seeds = [], []
    for _ in range(cfg.request_batch_size):
        prompts.append(encode_prompt(rng.sample(seeds, cfg.num_prompt_instructions)))
        request_seeds.append(rng.randrange(2**31))
    answers = teacher.answer(prompts, request_seeds)
    for answer in answers:
        state["usage"]["prompt_tokens"] += answer.prompt_tokens
        state["usage"]["completion_tokens"] += answer.completion_tokens
        parsed = parse_answer(answer.text, answer.finish_reason, cfg.num_prompt_instructions)
        state["candidates"] += len(parsed.tasks) + len(parsed.rejected)
        for reason, text in parsed.rejected:
            _reject(state, reason, text)
        for task in parsed.tasks:
            sim = index.similarity(task["instruction"])
            if sim.max_score > cfg.similarity_threshold:
                closest = next(iter(sim.most_similar))
                _reject(
                    state,
                    "too_similar",
                    f"{task['instruction']} ({sim.max_score:.2f} to: {closest})",
                )
                continue
            state["kept"].append(
                {
                    **task,
                    "most_similar_instructions": sim.most_similar,
                    "avg_similarity_score": sim.avg_score,
                }
            )
            index.add(task["instruction"])
    state["rounds"] += 1
    state["requests"] += len(prompts)
    state["rng_state"] = rng_state_to_json(rng)


def main(cfg: SelfInstructConfig) -> int:
    check_flags(cfg)
    out = Path(cfg.output_dir)
    seeds = load_seed_tasks(cfg.seed_tasks, cfg.num_prompt_instructions)
    state = _open_state(cfg, out, seeds)
    target = cfg.num_instructions_to_generate
    if cfg.resume:  # the outputs may be a round behind the state after a kill
        write_outputs(out, state, target)
        log(f"resuming {out}: {len(state['kept'])} kept after {state['rounds']} rounds", tag=TAG)
    from lora_alpaca.selfinstruct.teacher import make_teacher

    teacher = make_teacher(cfg)
    log(f"teacher: {teacher.description}; {len(seeds)} seed tasks", tag=TAG)
    index = RougeIndex()
    for task in seeds:
        index.add(task["instruction"])
    for task in state["kept"]:
        index.add(task["instruction"])

    # The bar starts after the first answered round, so a teacher that cannot be reached
    # or refuses the model leaves only its one error line.
    progress = None
    try:
        idle = 0
        while len(state["kept"]) < target:
            before = len(state["kept"])
            run_round(cfg, state, seeds, index, teacher)
            save_round(out, state, target)
            progress = progress or Progress(target, state)
            progress.set(len(state["kept"]))
            idle = 0 if len(state["kept"]) > before else idle + 1
            if idle and idle == cfg.max_rounds_without_progress:
                progress.close()
                write_report(out, state, target, teacher.description, cfg.price_per_1k_tokens)
                mix = ", ".join(
                    f"{r} {c}" for r, c in sorted(state["rejected"].items(), key=lambda kv: -kv[1])
                )
                raise TeacherStalled(
                    f"the teacher gave no usable task in {idle} rounds in a row (rejected: {mix}); "
                    f"{out} keeps every round (report.md shows examples): try a larger model or "
                    "--api completions, then --resume"
                )
    except KeyboardInterrupt:
        if progress:
            progress.close()
        log(f"interrupted; {out} holds every finished round: continue with --resume", tag=TAG)
        return 130
    if progress:
        progress.close()
    if not out.is_dir():  # N already reached on resume with nothing new: folder exists anyway
        save_round(out, state, target)
    report = write_report(out, state, target, teacher.description, cfg.price_per_1k_tokens)
    written = min(len(state["kept"]), target)
    log(
        f"wrote {written} tasks to {out / ALPACA_NAME} (Alpaca rows, for finetune.py --data) and "
        f"{out / REGEN_NAME}; report: {report}",
        tag=TAG,
    )
    return 0
