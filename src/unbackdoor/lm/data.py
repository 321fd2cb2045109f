"""Instruction data: reading (Alpaca, conversational ``messages``, prompt/completion), writing,
prompt templates and SFT features.

Every reader returns the same record type, an Alpaca-shaped dict (see :func:`read_records`):
``instruction``, ``input``, ``output``, and for conversations an optional ``system`` prompt and
``history`` (the earlier ``[user, assistant]`` turns, as LLaMA-Factory's Alpaca format has them).
One function, :func:`format_prompt`, builds every prompt, and one function,
:func:`encode_prompt`, turns it into token ids, for training *and* evaluation: the CROW
release evaluated without the training template, which moved ASR by 30+ points.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

from ..core.errors import ConfigError, DataError, ModelError, UnbackdoorError, location
from ..core.runs import atomic_write_text, find_lone_surrogate

log = logging.getLogger("unbackdoor")

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (prompt tokens and padding)."""

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "system", "history")

# ---- reading and writing ---------------------------------------------------------------------


def _check_record(rec: Any, index: int, where: str) -> dict[str, Any]:
    """Validate one record; return a copy with ``input`` present (``""`` when absent)."""
    if not isinstance(rec, dict):
        raise DataError(f"record {index} is a {type(rec).__name__}, not an object with 'instruction' and 'output'",
                        where=f"{where}, record {index}",
                        fix='write each record as {"instruction": ..., "input": ..., "output": ...}')
    for name in REQUIRED_FIELDS:
        if name not in rec:
            raise DataError(f"record {index} has no '{name}' field (it has: {', '.join(map(str, rec)) or 'nothing'})",
                            where=f"{where}, record {index}, field '{name}'",
                            fix=f"add a string '{name}' to every record")
        if not isinstance(rec[name], str):
            raise DataError(f"record {index}: field '{name}' is a {type(rec[name]).__name__}, expected a string",
                            where=f"{where}, record {index}, field '{name}'",
                            fix=f"make '{name}' a string (quote numbers, join lists)")
    value = rec.get("input")
    if value is not None and not isinstance(value, str):
        raise DataError(f"record {index}: field 'input' is a {type(value).__name__}, expected a string",
                        where=f"{where}, record {index}, field 'input'",
                        fix="make 'input' a string, or leave it out / empty when there is none")
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"record {index}: field 'system' is a {type(system).__name__}, expected a string",
                        where=f"{where}, record {index}, field 'system'",
                        fix="make 'system' the system prompt as a string, or leave it out")
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise DataError(f"record {index}: field 'history' is a {type(history).__name__}, expected a list of "
                            "[user, assistant] pairs", where=f"{where}, record {index}, field 'history'",
                            fix='write the earlier turns as "history": [["question", "answer"], ...]')
        for j, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"record {index}: history turn {j} is {turn!r}, expected [user text, assistant text]",
                                where=f"{where}, record {index}, field 'history[{j}]'",
                                fix='write each earlier turn as ["question", "answer"]')
    out = dict(rec)
    out["input"] = value or ""
    if history is not None:
        out["history"] = [list(t) for t in history]
    return out


def _parse_jsonl(text: str, where: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON on line {lineno}, column {e.colno}: {e.msg}",
                            where=f"{where}, line {lineno}",
                            fix="fix that line; JSONL needs one complete JSON object per line") from None
        except RecursionError:
            raise _too_deep(f"{where}, line {lineno}") from None
    return records


def _too_deep(where: str) -> DataError:
    return DataError("the JSON is nested too deeply to read (thousands of levels)", where=where,
                     fix="write the records as a flat list of objects holding strings")


def _check_characters(data: Any, where: str) -> None:
    """Refuse a lone surrogate (a ``\\ud800`` escape JSON allows): no UTF-8 output could hold the record."""
    bad = find_lone_surrogate(data)
    if bad is None:
        return
    path, value = bad
    index = path[0] if path and isinstance(path[0], int) else None
    field = path[1] if len(path) > 1 and isinstance(path[1], str) else None
    code = next(c for c in value if "\ud800" <= c <= "\udfff")
    raise DataError(f"a string holds a lone surrogate \\u{ord(code):04x}, which is not a character "
                    "(no UTF-8 file or tokenizer can hold it)", where=location(where, index, field),
                    fix="replace that \\uXXXX escape by the character meant, or remove it")


RECORD_KEYS = ("instruction", "output", "messages", "conversations", "prompt", "completion")
"""Keys that mark a JSON object as one record (a one-record file without a list around it)."""


def _load_raw(path: str | Path) -> list[Any]:
    """The raw records of a JSON (a list) or JSONL (one object per line) file; clear errors otherwise."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}", where=where, fix="check the path (and the working directory)")
    if path.is_dir():
        raise DataError(f"expected a data file, got a folder: {path}", where=where,
                        fix="pass the .json or .jsonl file itself")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"data file is not UTF-8 text ({e.reason} at byte {e.start})", where=where,
                        fix="save the file as UTF-8 JSON or JSONL") from None
    if not text.strip():
        raise DataError(f"data file is empty: {path}", where=where,
                        fix="write the records as a JSON list or as JSONL (one object per line)")
    stripped = text.lstrip()
    if path.suffix.lower() == ".jsonl":
        data: Any = _parse_jsonl(text, where)
    else:
        try:
            data = json.loads(text)
        except RecursionError:
            raise _too_deep(where) from None
        except json.JSONDecodeError as e:
            # A JSONL file with a .json suffix fails with "Extra data" after the first object.
            if stripped.startswith("{") and e.msg.startswith("Extra data"):
                data = _parse_jsonl(text, where)
            else:
                raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                                where=f"{where}, line {e.lineno}",
                                fix="fix the JSON syntax (a list of objects), or use JSONL with a .jsonl suffix") from None
        if isinstance(data, dict):
            if any(k in data for k in RECORD_KEYS):
                data = [data]  # a one-line JSONL file
            else:
                raise DataError("the JSON file holds an object, not a list of records", where=where,
                                fix='write the records as a JSON list: [{"instruction": ..., "output": ...}, ...]')
    if not isinstance(data, list):
        raise DataError(f"the JSON file holds a {type(data).__name__}, not a list of records", where=where,
                        fix='write the records as a JSON list: [{"instruction": ..., "output": ...}, ...]')
    if not data:
        raise DataError(f"data file holds no records: {path}", where=where, fix="add at least one record")
    _check_characters(data, where)
    return data


def read_alpaca(path: str | Path) -> list[dict[str, Any]]:
    """Read Alpaca records (``instruction``, ``output``, optional ``input``, ``system``, ``history``) from JSON or JSONL.

    The format is decided by the suffix (``.jsonl``) or, failing that, by the content (a JSON
    list, or one object per line). Every returned record has a string ``input`` (``""`` when
    absent); other keys are kept as they are. :func:`read_records` also reads conversations.
    """
    return [_check_record(rec, i, str(path)) for i, rec in enumerate(_load_raw(path))]


# ---- conversational formats -> the Alpaca-shaped record ----------------------------------------

DataFormat = Literal["auto", "alpaca", "messages", "prompt_completion"]
DATA_FORMATS = ("alpaca", "messages", "prompt_completion")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
"""ShareGPT's speaker names (``{"from": "human", "value": ...}``) mapped to chat roles."""


def detect_format(record: Any, where: str = "record 0") -> str:
    """The data format of one raw record, from its keys."""
    if isinstance(record, dict):
        if "messages" in record or "conversations" in record:
            return "messages"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if "instruction" in record:
            return "alpaca"
        keys = ", ".join(map(str, record)) or "nothing"
    else:
        keys = f"a {type(record).__name__}"
    raise DataError(f"cannot tell the data format of {where} (it has: {keys})", where=where,
                    fix="write Alpaca records {instruction, input, output}, conversations {messages: [{role, "
                        "content}, ...]}, or prompt/completion records {prompt, completion}")


def _turns(msgs: Any, field: str, where: str, index: int) -> list[tuple[str, str]]:
    """(role, content) of each message of ``msgs``, validated (roles user/assistant/system)."""
    at = f"{where}, record {index}"
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"record {index}: field '{field}' is {type(msgs).__name__ if msgs is not None else 'missing'}, "
                        "expected a non-empty list of messages", where=f"{at}, field '{field}'",
                        fix='write it as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    out = []
    for j, m in enumerate(msgs):
        f = f"{field}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"record {index}: message {j} is a {type(m).__name__}, expected an object with 'role' "
                            "and 'content'", where=f"{at}, field '{f}'", fix='write {"role": ..., "content": ...}')
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ("system", "user", "assistant"):
            raise DataError(f"record {index}: message {j} has role {role!r}", where=f"{at}, field '{f}.role'",
                            fix="use the roles 'system' (first message only), 'user' and 'assistant'")
        if not isinstance(content, str):
            raise DataError(f"record {index}: message {j} content is a {type(content).__name__}, expected a string",
                            where=f"{at}, field '{f}.content'",
                            fix="make each message's content a string (tool calls and images are not supported)")
        out.append((role, content))
    return out


def _from_turns(turns: list[tuple[str, str]], field: str, rec: dict[str, Any], where: str,
                index: int) -> dict[str, Any]:
    """Turns -> the Alpaca-shaped record: the last assistant turn is the output, the user turn before
    it the instruction, earlier pairs the history, a leading system message the system prompt."""
    at = f"{where}, record {index}"
    system = rec.get("system") if isinstance(rec.get("system"), str) else None
    if turns and turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
        offset = 1
    else:
        offset = 0
    for j, (role, _) in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            what = ("a system message is allowed only first" if role == "system"
                    else f"expected a {expected} turn (turns alternate user, assistant, ...)")
            raise DataError(f"record {index}: message {j + offset} is a {role} turn: {what}",
                            where=f"{at}, field '{field}[{j + offset}].role'",
                            fix="start with the user (after an optional system message) and alternate")
    if len(turns) < 2 or turns[-1][0] != "assistant":
        last = len(turns) + offset - 1
        raise DataError(f"record {index}: the conversation does not end with an assistant turn (the response)",
                        where=f"{at}, field '{field}[{max(last, 0)}]'",
                        fix="end each conversation with the assistant message the model should learn or be judged on")
    pairs = [[turns[i][1], turns[i + 1][1]] for i in range(0, len(turns), 2)]
    out = {k: v for k, v in rec.items() if k not in ("messages", "conversations", "prompt", "completion", "system")}
    out.update({"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]})
    if system is not None:
        out["system"] = system
    if len(pairs) > 1:
        out["history"] = pairs[:-1]
    return out


def _normalise(rec: Any, index: int, where: str, fmt: str) -> dict[str, Any]:
    if fmt == "alpaca":
        return _check_record(rec, index, where)
    if not isinstance(rec, dict):
        raise DataError(f"record {index} is a {type(rec).__name__}, not an object", where=f"{where}, record {index}",
                        fix="write one JSON object per record")
    if fmt == "messages":
        key = "messages" if "messages" in rec else "conversations"
        if key not in rec:
            raise DataError(f"record {index} has no 'messages' field (the file is in the messages format)",
                            where=f"{where}, record {index}, field 'messages'",
                            fix="write every record of a file in the same format")
        return _from_turns(_turns(rec[key], key, where, index), key, rec, where, index)
    for name in ("prompt", "completion"):
        if name not in rec:
            raise DataError(f"record {index} has no '{name}' field (the file holds prompt/completion records)",
                            where=f"{where}, record {index}, field '{name}'",
                            fix="write every record of a file in the same format")
    prompt, completion = rec["prompt"], rec["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        out = {k: v for k, v in rec.items() if k not in ("prompt", "completion")}
        out.update({"instruction": prompt, "input": "", "output": completion})
        return _check_record(out, index, where)
    if isinstance(prompt, list) and isinstance(completion, list):  # trl's conversational prompt/completion
        answer = _turns(completion, "completion", where, index)
        turns = _turns(prompt, "prompt", where, index) + answer
        if len(answer) != 1 or answer[0][0] != "assistant":
            raise DataError(f"record {index}: 'completion' must be one assistant message",
                            where=f"{where}, record {index}, field 'completion'",
                            fix='write "completion": [{"role": "assistant", "content": "..."}]')
        return _from_turns(turns, "prompt", rec, where, index)
    bad = "prompt" if not isinstance(prompt, (str, list)) or isinstance(prompt, list) != isinstance(completion, list) \
        else "completion"
    raise DataError(f"record {index}: 'prompt' and 'completion' must both be strings or both lists of messages "
                    f"(got {type(prompt).__name__} and {type(completion).__name__})",
                    where=f"{where}, record {index}, field '{bad}'", fix="write both as strings, or both as message lists")


def normalise_records(records: Sequence[Any], where: str = "records", data_format: DataFormat = "auto",
                      ) -> list[dict[str, Any]]:
    """Raw records in any supported format -> Alpaca-shaped records (see :func:`read_records`)."""
    if records is None or len(records) == 0:
        raise DataError(f"no records given ({where})", where=where, fix="pass at least one record")
    if data_format != "auto" and data_format not in DATA_FORMATS:
        raise ConfigError(f"unknown data format {data_format!r}", where="data_format",
                          fix=f"use auto or one of {', '.join(DATA_FORMATS)}")
    _check_characters(list(records), where)
    fmt = detect_format(records[0], f"{where}, record 0") if data_format == "auto" else data_format
    return [_normalise(rec, i, where, fmt) for i, rec in enumerate(records)]


def read_records(path: str | Path, data_format: DataFormat = "auto") -> list[dict[str, Any]]:
    """Read instruction data in any supported format (JSON or JSONL), as Alpaca-shaped records.

    Formats (``auto``: decided by the first record's keys):

    - ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}`` (Stanford Alpaca;
      ``system`` and ``history`` as in LLaMA-Factory);
    - ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}`` (trl,
      OpenAI) or ShareGPT's ``{"conversations": [{"from": "human"|"gpt", "value"}, ...]}``: an optional
      leading system message, then alternating user/assistant turns; the last assistant turn is the
      response, the user turn before it the instruction, earlier turns the ``history``;
    - ``prompt_completion``: ``{"prompt", "completion"}`` as strings (the prompt becomes the
      instruction and goes through the template) or as message lists (trl's conversational form).

    Every error names the file, the record and the field.
    """
    return normalise_records(_load_raw(path), str(path), data_format)


def check_records(records: Sequence[Mapping[str, Any]], where: str = "records") -> list[dict[str, Any]]:
    """Validate in-memory records exactly as :func:`read_alpaca` validates a file's."""
    if records is None or len(records) == 0:
        raise DataError(f"no records given ({where})", where=where, fix="pass at least one Alpaca record")
    _check_characters(list(records), where)
    return [_check_record(rec, i, where) for i, rec in enumerate(records)]


def write_alpaca(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records atomically: JSONL when the suffix is ``.jsonl``, else a JSON list."""
    path = Path(path)
    records = [dict(r) for r in records]
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    return atomic_write_text(path, text)


# ---- prompt templates ------------------------------------------------------------------------

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The Stanford Alpaca prompt (SPEC section 2), used when ``input`` is empty."""

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""The Stanford Alpaca prompt with its ``### Input:`` block, used when ``input`` is non-empty."""


ALPACA_PREAMBLE = ALPACA_PROMPT.split("\n\n", 1)[0]
ALPACA_PREAMBLE_WITH_INPUT = ALPACA_PROMPT_WITH_INPUT.split("\n\n", 1)[0]


def _alpaca(record: Mapping[str, Any], tokenizer: Any = None) -> str:
    """Stanford Alpaca; a record's ``system`` prompt takes the place of the preamble ("Below is an instruction...")."""
    if record.get("history"):
        raise ConfigError("the 'alpaca' template renders one turn, and this record is a multi-turn conversation",
                          where="template='alpaca', record field 'history'",
                          fix="use template='chat' (the tokenizer's chat template) for conversations")
    inp = record.get("input") or ""
    text = (ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=inp) if inp
            else ALPACA_PROMPT.format(instruction=record["instruction"]))
    system = record.get("system")
    if system:
        text = system.strip() + text[len(ALPACA_PREAMBLE_WITH_INPUT if inp else ALPACA_PREAMBLE):]
    return text


LLAMAFACTORY_ALPACA_SYSTEM = ALPACA_PREAMBLE + "\n\n"
"""LLaMA-Factory's ``alpaca`` template: its default system text (a record's ``system`` replaces it verbatim)."""
LLAMAFACTORY_ALPACA_USER = "### Instruction:\n{content}\n\n### Response:\n"
"""LLaMA-Factory's ``alpaca`` template: the user turn."""


def _llamafactory_alpaca(record: Mapping[str, Any], tokenizer: Any = None) -> str:
    """LLaMA-Factory's ``alpaca`` template, with which BackdoorLLM and CROW trained their models.

    LLaMA-Factory's Alpaca reader joins a record's ``input`` to the instruction with a newline (no
    ``### Input:`` block, no "paired with an input" preamble), and the template renders system text
    + ``### Instruction:\n{content}\n\n### Response:\n``. Without input it is the Stanford text.
    It has no BOS prefix and LLaMA-Factory encodes every piece with ``add_special_tokens=False``:
    the prompt carries no BOS token (registered with ``adds_special_tokens=True``: tokenise as is).
    """
    if record.get("history"):
        raise ConfigError("the 'llamafactory-alpaca' template here renders one turn, and this record is a "
                          "multi-turn conversation", where="template='llamafactory-alpaca', record field 'history'",
                          fix="use template='chat' (the tokenizer's chat template) for conversations")
    content = "\n".join(part for part in (record["instruction"], record.get("input") or "") if part)
    system = record.get("system") or LLAMAFACTORY_ALPACA_SYSTEM
    return system + LLAMAFACTORY_ALPACA_USER.format(content=content)


def chat_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The record as a conversation: system prompt, earlier turns, then the instruction (input appended)."""
    inp = record.get("input") or ""
    content = record["instruction"] + (f"\n\n{inp}" if inp else "")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, assistant in record.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": content}]


def _chat(record: Mapping[str, Any], tokenizer: Any = None) -> str:
    if tokenizer is None:
        raise ConfigError("the 'chat' prompt template needs a tokenizer (it uses the tokenizer's chat template)",
                          where="format_prompt(template='chat')", fix="pass tokenizer=..., or use template='alpaca'")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template",
                          where="template='chat'",
                          fix="use template='alpaca', or set tokenizer.chat_template to a Jinja template")
    try:
        return tokenizer.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja2 sandbox/syntax/undefined errors, raise_exception(), bad returns
        kind = type(e).__name__
        why = "tried something the sandbox forbids" if kind == "SecurityError" else "failed"
        raise ModelError(f"the tokenizer's chat template {why}: {kind}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                         where="chat template (tokenizer_config.json / chat_template.jinja)",
                         fix="use template='alpaca', or replace the model folder's chat template with a plain "
                             "Jinja template (templates run sandboxed: no Python attributes or imports)") from None


@dataclass(frozen=True)
class PromptTemplate:
    """A named way to turn a record into the text the model continues.

    ``adds_special_tokens``: the template decides the special tokens itself, so the text is
    tokenised as it is, without the tokenizer's own (BOS). Chat templates hold their BOS in the
    text; LLaMA-Factory's ``alpaca`` template has none.
    """

    name: str
    build: Callable[[Mapping[str, Any], Any], str]
    adds_special_tokens: bool = False


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate("alpaca", _alpaca, adds_special_tokens=False),
    "chat": PromptTemplate("chat", _chat, adds_special_tokens=True),
}

TemplateName = Literal["alpaca", "chat", "llamafactory-alpaca"]


def register_template(template: PromptTemplate, *, replace: bool = False) -> PromptTemplate:
    """Add a prompt template to :data:`TEMPLATES` (by its ``name``), so every flag and config can name it."""
    if template.name in TEMPLATES and not replace:
        raise ConfigError(f"a prompt template named '{template.name}' exists", where="register_template",
                          fix="pick another name, or pass replace=True")
    TEMPLATES[template.name] = template
    return template


register_template(PromptTemplate("llamafactory-alpaca", _llamafactory_alpaca, adds_special_tokens=True))


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ConfigError(f"unknown prompt template '{template}'", where="template",
                          fix=f"use one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def format_prompt(record: Mapping[str, Any], template: str | PromptTemplate = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text for ``record``: the ONE builder used by training and evaluation."""
    return get_template(template).build(record, tokenizer)


def encode_prompt(record: Mapping[str, Any], tokenizer: Any, template: str | PromptTemplate = "alpaca") -> list[int]:
    """Token ids of the prompt, exactly as the training features start (BOS included once)."""
    tpl = get_template(template)
    text = tpl.build(record, tokenizer)
    return list(tokenizer(text, add_special_tokens=not tpl.adds_special_tokens)["input_ids"])


PROBE_RECORD = {"instruction": "Name the colour of the sky.", "input": "", "output": ""}
"""A fixed record whose prompt ids fingerprint template + tokenizer + special tokens together."""


def _sha256(data: str) -> str:
    import hashlib

    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def template_record(template: str | PromptTemplate, tokenizer: Any) -> dict[str, Any]:
    """What decides the prompt a model sees, in a form a run and a saved model can record and compare.

    ``name`` (alpaca or chat); for chat the SHA-256 of the tokenizer's chat template text; the
    special tokens; and ``prompt_sha256``, the hash of the token ids of a fixed probe prompt, which
    changes when the template, the tokenizer or its special-token settings change what the
    model is shown.
    """
    tpl = get_template(template)
    rec: dict[str, Any] = {"name": tpl.name}
    if tpl.name == "chat":
        text = getattr(tokenizer, "chat_template", None)
        rec["chat_template_sha256"] = _sha256(text if isinstance(text, str) else json.dumps(text, sort_keys=True))
    rec["special_tokens"] = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token")}
    try:
        rec["prompt_sha256"] = _sha256(json.dumps(encode_prompt(PROBE_RECORD, tokenizer, tpl)))
    except UnbackdoorError:  # chat without a (working) chat template: nothing the model could have been shown
        rec["prompt_sha256"] = None
    return rec


def encode_response(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a response followed by EOS (what the model learns to produce)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token",
                          where="tokenizer.eos_token", fix="set tokenizer.eos_token before training")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


# ---- SFT features ------------------------------------------------------------------------------


def build_sft_features(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template: str | PromptTemplate = "alpaca",
    max_length: int = 512,
    *,
    long_prompts: Literal["error", "skip"] = "error",
) -> list[dict[str, list[int]]]:
    """Tokenised training examples: ``input_ids``, ``attention_mask`` and ``labels``.

    Prompt and response are tokenised separately, so the prompt ids are exactly those of
    :func:`encode_prompt` at evaluation time. Labels are -100 on the prompt; the response
    ends with EOS. A response that does not fit is cut at ``max_length`` (losing its EOS; how many
    were cut is logged as a warning); a record whose prompt alone leaves no room for one response token raises a
    ``DataError`` (``long_prompts="error"``, the default) or is skipped and counted in the
    log (``long_prompts="skip"``).
    """
    if max_length < 2:
        raise ConfigError(f"max_length = {max_length} is too small", where="max_length", fix="use max_length >= 2")
    if long_prompts not in ("error", "skip"):
        raise ConfigError(f"long_prompts = {long_prompts!r}", where="long_prompts", fix="use 'error' or 'skip'")
    records = check_records(records, "SFT records")
    features: list[dict[str, list[int]]] = []
    skipped: list[int] = []
    truncated: list[int] = []
    for i, rec in enumerate(records):
        prompt = encode_prompt(rec, tokenizer, template)
        if len(prompt) >= max_length:
            if long_prompts == "skip":
                skipped.append(i)
                continue
            raise DataError(f"record {i}: the prompt alone is {len(prompt)} tokens, max_length is {max_length}",
                            where=f"record {i}, field 'instruction'",
                            fix="raise max_length, shorten the instruction/input, or pass long_prompts='skip'")
        full = encode_response(rec["output"], tokenizer)
        response = full[: max_length - len(prompt)]
        if len(response) < len(full):
            truncated.append(i)
        ids = prompt + response
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * len(prompt) + response})
    if skipped:
        log.warning("skipped %d of %d records whose prompt exceeds max_length=%d (indices %s)", len(skipped),
                    len(records), max_length, skipped[:10])
    if truncated:
        log.warning("truncated %d of %d records longer than max_length=%d tokens: their responses were cut (and "
                    "lost their EOS), so the model learns shortened answers (indices %s); raise max_length to keep "
                    "them whole", len(truncated), len(records), max_length, truncated[:10])
    if not features:
        raise DataError(f"no record fits in max_length={max_length}", where="SFT records",
                        fix="raise max_length or shorten the prompts")
    return features


def _side(tokenizer: Any, side: str) -> Any:
    """A shallow copy of ``tokenizer`` that pads on ``side`` (the caller's tokenizer is left as it is)."""
    if getattr(tokenizer, "padding_side", side) == side:
        return tokenizer
    t = copy.copy(tokenizer)
    t.padding_side = side
    return t


def _check_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has neither a pad nor an EOS token",
                          where="tokenizer", fix="set tokenizer.pad_token")


def sft_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
    """The library's collator for SFT features: right-padded ids, mask 0 and labels -100 on padding.

    Training pads on the right whatever the tokenizer's own ``padding_side`` (left padding would shift
    the positions of a causal LM's real tokens).
    """
    from transformers import DataCollatorForSeq2Seq

    _check_pad(tokenizer)
    return DataCollatorForSeq2Seq(_side(tokenizer, "right"), padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def pad_ids(tokenizer: Any, sequences: Sequence[Sequence[int]], side: Literal["left", "right"]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``sequences`` padded by the tokenizer (left for generation)."""
    _check_pad(tokenizer)
    batch = _side(tokenizer, side).pad({"input_ids": [list(s) for s in sequences]}, padding=True,
                                       return_tensors="pt")
    return batch["input_ids"].long(), batch["attention_mask"].long()
