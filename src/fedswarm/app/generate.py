"""`fedswarm generate`: an answer (or a continuation) from a Hugging Face folder, e.g. one `fedswarm export` wrote.

A folder tuned on chat records (export records the run's --format), or any folder whose tokenizer has a chat
template and no fedswarm record, is asked through that template: the prompt becomes a user turn (after an
optional system turn), the template's generation prompt opens the assistant's turn, and only the answer is
printed, up to the template's end-of-turn token. `--raw` (and every byte-tokenizer preset, which has no
template) continues the prompt as plain text.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from fedswarm.app.export import exported_format, load_exported

MODES = ("auto", "chat", "raw")
SENTINEL = "FEDSWARMANSWERSENTINEL"   # an assistant turn's content, to find what the template puts after it


@dataclass
class Sample:
    """What generate fed the model and what it printed."""

    answer: str              # the generated tokens, decoded without special tokens
    chat: bool               # True: the prompt went through the chat template
    prompt_ids: list[int]    # the ids model.generate() received
    prompt_text: str         # the same ids decoded as they are (special tokens shown)
    stop_ids: list[int]      # ids that end the answer (chat: eos and the template's end of turn)


def choose_mode(folder: str, tokenizer, mode: str = "auto") -> str:
    """'chat' or 'raw'. auto: the folder's recorded --format if export wrote one, else chat when the
    tokenizer has a chat template."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "auto":
        recorded = exported_format(folder)
        mode = "chat" if recorded == "chat" or (recorded is None and has_template) else "raw"
    if mode == "chat" and not has_template:
        raise ValueError(f"the tokenizer in {folder} has no chat template (a byte-level preset has none): drop "
                         "--chat and --system to continue the prompt as plain text")
    return mode


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The user turn (after a system turn, if given) and the assistant's opening, through the chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as err:  # noqa: BLE001 - a template's own raise_exception (e.g. no system role) is jinja's
        hint = "; drop --system: this template may take no system turn" if system else ""
        raise ValueError(f"the chat template refused the conversation ({err}){hint}") from None
    return [int(i) for i in ids]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the template writes right after an assistant's answer (<|im_end|>, <|eot_id|>, ...)."""
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this turn names no end of turn
        return None
    _, found, after = text.partition(SENTINEL)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if found and after else []
    return int(ids[0]) if ids and ids[0] in tokenizer.added_tokens_decoder else None


def stop_ids(tokenizer, model) -> list[int]:
    """eos (the tokenizer's and the generation config's) and the template's end-of-turn token."""
    found: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  end_of_turn_id(tokenizer)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in found:
                found.append(int(i))
    return found


def generate(folder: str, prompt: str, *, system: str | None = None, mode: str = "auto", max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, base: str | None = None) -> Sample:
    """The model in `folder` answers `prompt` (chat) or continues it (raw); greedy at temperature 0."""
    from transformers import AutoTokenizer

    if not prompt.strip():
        raise ValueError("the prompt is empty: pass some text with --prompt (or on standard input with --prompt -)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    chat = choose_mode(folder, tokenizer, mode) == "chat"
    if system is not None and not chat:
        raise ValueError("--system is a turn of the chat template, and this prompt is continued as plain text: "
                         "drop --raw (or --system)")
    ids = chat_prompt_ids(tokenizer, prompt, system) if chat else \
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = load_exported(folder, base)
    stops = stop_ids(tokenizer, model) if chat else []
    x = torch.tensor([ids], dtype=torch.long)
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_k=None, top_p=None, **({"eos_token_id": stops} if stops else {}),
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    new = out[0, len(ids):].tolist()
    if new and new[-1] in stops:
        new = new[:-1]   # the end of turn itself is not part of the answer (even when it is not a special token)
    return Sample(tokenizer.decode(new, skip_special_tokens=True), chat, list(ids), tokenizer.decode(ids), stops)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="HF_DIR", help="a folder written by export (or any HF folder)")
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the question (chat) or the text to continue (raw); '-' reads it from standard input")
    p.add_argument("--system", default=None, metavar="TEXT", help="chat: a system prompt before the question")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--raw", dest="mode", action="store_const", const="raw",
                     help="continue the prompt as plain text, without the chat template (default: see --chat)")
    how.add_argument("--chat", dest="mode", action="store_const", const="chat",
                     help="ask through the tokenizer's chat template even if the folder was tuned on plain text "
                          "(default: chat for a folder tuned with --format chat, or one with a template and no "
                          "fedswarm record; else raw)")
    p.set_defaults(mode="auto")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the prompt as the model receives it (the rendered template) to standard error")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--base", default=None, metavar="HF_DIR", help="adapter folders: the base model (default: recorded)")


def read_prompt(arg: str, stdin=None) -> str:
    """--prompt's text; '-' reads standard input (without its final newline)."""
    if arg != "-":
        return arg
    return (stdin or sys.stdin).read().rstrip("\n")


def generate_main(args: argparse.Namespace) -> int:
    try:
        sample = generate(args.model, read_prompt(args.prompt), system=args.system, mode=args.mode,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                          base=args.base)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.show_prompt:
        print(f"prompt ({'chat template' if sample.chat else 'raw'}, {len(sample.prompt_ids)} tokens):\n"
              f"{sample.prompt_text}", file=sys.stderr)
    print(sample.answer)
    return 0
