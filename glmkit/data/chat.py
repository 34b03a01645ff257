"""Chat rows: conversations rendered with the model's own chat template, and which of their tokens are trained.

A chat row (a JSONL line, or a parquet row with a `messages` column) is

    {"messages": [{"role": ..., "content": ..., "reasoning_content"?: ..., "tool_calls"?: [...]}, ...],
     "tools"?: [...]}

with roles `system`, `user`, `assistant` and `tool` (`observation` is read as `tool`). `content` is a
string, null, or a list of `{"type": "text", "text": ...}` parts; a tool call is `{"function": {"name",
"arguments"}}` or `{"name", "arguments"}`, its arguments a mapping or a JSON object string (the OpenAI wire
form, parsed here; in parquet give them as a string, since a struct column fills in every other row's
keys as nulls). Null values are dropped from tool definitions for the same reason. Nothing about the format is rendered here: `tokenizer.apply_chat_template` renders each
conversation with the template in `paths.model_dir` (tokenizer_config.json or chat_template.jinja), and
control-token strings inside the messages are encoded as text (transformers' `sanitize_control_tokens`),
so the only role markers in the tokens are the ones the template wrote.

Which tokens are trained is read off that rendering. GLM's template writes `[gMASK]<sop>`, then one role
marker per message (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>`; consecutive tool
messages share one `<|observation|>`, and `tools` add a `<|system|>` header first). There is no
end-of-turn token: a turn runs from its marker to the next marker, the last one to the EOS the kit
appends. The rule (`train_on: assistant`):

- an assistant turn's tokens after its `<|assistant|>` marker are trained: its thinking where the template
  kept it, its content, its tool calls; so is the token that closes the turn (the next marker, usually
  `<|user|>` or `<|observation|>`, or EOS), or the model never learns to stop. The `<|assistant|>` marker
  itself is the prompt (generation starts after it) and is not trained, unless it closes the turn before;
- GLM's template drops the thinking of turns before the last user message and writes an empty
  `<think></think>` in its place. That placeholder (and the whitespace before it) is not trained in those
  turns: the template writes it whether or not the turn thought, so training on it would teach the model to
  skip thinking. After the last user message the template keeps thinking, so an empty pair there is what
  the assistant really said (it answered without thinking) and is trained;
- everything else (the prefix, system, user and observation turns) is context only.

`last_assistant` trains the last assistant turn alone (and its closing token); `all` trains every token,
like text. The check is exact: the markers found must be the markers the messages call for, or the row is
refused as a bad line naming why.

A conversation longer than `training.max_seq_length` (with its EOS) is, by `training.long_conversations`,
dropped or split at round boundaries (a round starts at a user message): each piece is a conversation of
its own, the leading system messages and the tools repeated, rendered by the template again (so a piece's
last turns keep their thinking, as they would at inference). With `last_assistant` only the piece that ends
with the conversation is kept, with as many earlier rounds as fit. A round that does not fit on its own is
dropped and counted; no turn is ever cut in half.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from glmkit.data.sources import MESSAGES_FIELD, TOOLS_FIELD

TRAIN_ON = ("assistant", "last_assistant", "all")
LONG_CONVERSATIONS = ("split", "drop")
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"observation": "tool"}
# The marker each role's turn starts with in GLM's template.
MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|observation|>"}
THINK, END_THINK = "<think>", "</think>"
COUNTS = ("conversations", "split", "pieces", "dropped", "dropped_rounds", "trained_tokens")


class ChatTemplateError(ValueError):
    """The model folder's tokenizer can't render chat rows (no template, or markers that are not single tokens)."""


@dataclass(frozen=True)
class ChatSettings:
    """How a chat file's rows become documents: part of its token store's key."""
    train_on: str = "assistant"
    max_seq_length: int = 4096
    long_conversations: str = "split"

    def key(self) -> list:
        return ["chat", self.train_on, self.max_seq_length, self.long_conversations]


@dataclass
class Conversation:
    messages: list[dict]
    tools: list | None = None

    @functools.cached_property
    def canonical(self) -> str:
        """The conversation in one canonical string: what its content hash is taken of, and where control-token
        strings are looked for."""
        return json.dumps([self.messages, self.tools], sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------
# A row -> a conversation, or the reason it is a bad line
# ---------------------------------------------------------------------------

def conversation(record) -> tuple[Conversation | None, str | None]:
    """(the row's conversation, None) or (None, why it is a bad line)."""
    if not isinstance(record, dict) or record.get(MESSAGES_FIELD) is None:
        return None, f"missing field {MESSAGES_FIELD!r} (a chat row is {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}})"
    raw = record[MESSAGES_FIELD]
    if not isinstance(raw, list) or not raw:
        return None, f"field {MESSAGES_FIELD!r} is not a non-empty list of messages"
    messages = []
    for index, message in enumerate(raw):
        normalized, reason = _message(message)
        if reason:
            return None, f"messages[{index}]: {reason}"
        messages.append(normalized)
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant turn (nothing to train on); add the assistant's reply or drop the row"
    tools = record.get(TOOLS_FIELD)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return None, f"field {TOOLS_FIELD!r} is not a list of tool definitions"
    return Conversation(messages, [_without_nulls(t) for t in tools] if tools else None), None


def _without_nulls(value):
    """A tool definition without null values: a parquet struct column gives every row every key of every row,
    the missing ones null, which the template would render into the schema."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _message(message) -> tuple[dict | None, str | None]:
    if not isinstance(message, dict):
        return None, "not a mapping with a role and content"
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        return None, (f"unknown role {message.get('role')!r}; use one of {', '.join(ROLES)} "
                      f"(or observation for tool)")
    out = {"role": role}
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, str) or isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            return None, "content is a list with parts other than {\"type\": \"text\", \"text\": ...}"
        content = "".join(p if isinstance(p, str) else p["text"] for p in content)
    if content is not None and not isinstance(content, str):
        return None, "content is not a string"
    if content is not None:
        out["content"] = content
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            return None, "reasoning_content must be a string, on an assistant message"
        out["reasoning_content"] = reasoning
    calls = message.get("tool_calls")
    if calls:  # null and [] are "no calls"
        if role != "assistant" or not isinstance(calls, list):
            return None, "tool_calls must be a list, on an assistant message"
        out["tool_calls"] = []
        for number, call in enumerate(calls):
            normalized, reason = _tool_call(call)
            if reason:
                return None, f"tool_calls[{number}]: {reason}"
            out["tool_calls"].append(normalized)
    if role != "assistant" and content is None:
        return None, "content is missing"
    return out, None


def _tool_call(call) -> tuple[dict | None, str | None]:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        return None, "expected {\"function\": {\"name\": ..., \"arguments\": {...}}}"
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None, "arguments is a string that is not JSON"
    if not isinstance(arguments, dict):
        return None, "arguments is not a JSON object"
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}, None


# ---------------------------------------------------------------------------
# Rendering and the trained positions
# ---------------------------------------------------------------------------

def template_problem(tokenizer, model_dir: str) -> str | None:
    """Why the tokenizer of `model_dir` can't render chat rows (None: it can)."""
    if not getattr(tokenizer, "chat_template", None):
        return (f"{model_dir} has no chat template (no chat_template.jinja, no chat_template in "
                f"tokenizer_config.json); chat data is rendered with the model's own template: download the "
                f"model's tokenizer files again, or use format: text")
    vocab = tokenizer.get_vocab()
    missing = [m for m in MARKERS.values() if m not in vocab]
    if missing:
        return (f"{model_dir}: the tokenizer has no single token for the role marker(s) {', '.join(missing)}; "
                f"chat rows need GLM's markers to find the assistant's turns")
    return None


class Renderer:
    """Conversations -> token ids and trained flags, with the tokenizer (and template) of paths.model_dir."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.eos = tokenizer.eos_token_id
        self.marker_role = {vocab[m]: role for role, m in MARKERS.items()}
        self.is_marker = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=bool)  # a lookup per token id
        self.is_marker[list(self.marker_role)] = True
        self.think_id, self.end_think_id = vocab.get(THINK), vocab.get(END_THINK)
        # Strings that the tokenizer would read as one of its added tokens: a message holding one is encoded
        # the slow, exact way (transformers' sanitize_control_tokens), so its text stays text.
        self.added = tuple(t for t in tokenizer.get_added_vocab() if t)

    def ids(self, conversations: list[Conversation]) -> list[list[int]]:
        """Each conversation rendered by the template and tokenized, control strings in the messages as text."""
        apply = self.tokenizer.apply_chat_template
        rendered = [apply(c.messages, tools=c.tools, tokenize=False) for c in conversations]
        plain = [i for i, c in enumerate(conversations) if not self._holds_added_token(c)]
        out: list = [None] * len(conversations)
        if plain:
            encoded = self._encode([rendered[i] for i in plain])
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        for i, c in enumerate(conversations):
            if out[i] is None:
                out[i] = apply(c.messages, tools=c.tools, tokenize=True, return_dict=False,
                               sanitize_control_tokens=True)
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """What `tokenizer(texts, add_special_tokens=False)` gives, by the Rust tokenizer without offsets."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _holds_added_token(self, conversation: Conversation) -> bool:
        return any(token in conversation.canonical for token in self.added)

    def turns(self, ids: np.ndarray, messages: list[dict], tools) -> tuple[np.ndarray | None, list[str] | str]:
        """(each marker's position, its role) in the rendering, or (None, why they are not the messages' turns).

        The markers must be the messages' roles in order (consecutive tool messages share one), after at most
        one `<|system|>` header the template writes for the tools."""
        at = np.flatnonzero(self.is_marker[ids])
        found = [self.marker_role[int(ids[i])] for i in at]
        expected = [m["role"] for i, m in enumerate(messages)
                    if not (m["role"] == "tool" and i and messages[i - 1]["role"] == "tool")]
        extra = len(found) - len(expected)
        if found[extra:] != expected or extra not in ((0, 1) if tools else (0,)) or found[:extra] not in ([], ["system"]):
            return None, (f"the chat template rendered the turns {' '.join(found) or '(none)'} where the messages "
                          f"give {' '.join(expected)}; the template does not follow GLM's format")
        return at, found

    def trained(self, ids: np.ndarray, messages: list[dict], tools, train_on: str,
                turns: tuple | None = None) -> tuple[np.ndarray | None, str | None]:
        """(a bool per token of ids + EOS, None) or (None, why the rendering can't be read); `turns`: what
        `turns()` returned for these ids, if known."""
        flags = np.zeros(len(ids) + 1, dtype=bool)
        at, found = turns or self.turns(ids, messages, tools)
        if at is None:
            return None, found
        if train_on == "all":
            flags[:] = True
            return flags, None
        ends = np.append(at[1:], len(ids))  # a turn runs to the next marker, the last one to the EOS
        users = at[[role == "user" for role in found]]
        last_user = int(users[-1]) if len(users) else -1
        assistant = [i for i, role in enumerate(found) if role == "assistant"]
        for i in assistant[-1:] if train_on == "last_assistant" else assistant:
            start, end = int(at[i]), int(ends[i])
            first = start + 1
            if start < last_user:
                first = self._after_placeholder(ids, first, end)
            flags[first:end + 1] = True  # end: the marker (or EOS) that closes the turn
        return flags, None

    def _after_placeholder(self, ids: np.ndarray, first: int, end: int) -> int:
        """Where training starts in a turn before the last user message: past an empty `<think></think>` that
        opens it (and the whitespace before that), which the template writes in place of dropped thinking."""
        if self.think_id is None:
            return first
        window = ids[first:min(end, first + 6)].tolist()
        if self.think_id not in window:
            return first
        k = window.index(self.think_id)
        if k + 1 < len(window) and window[k + 1] == self.end_think_id and \
                not self.tokenizer.decode(window[:k]).strip():
            return first + k + 2
        return first

    # -- one conversation -> its documents ------------------------------------------------------------

    def documents(self, conversation: Conversation, ids: list[int], settings: ChatSettings, counts: dict):
        """[(ids with EOS, trained flags)] for one conversation (already rendered as `ids`), split or dropped
        when longer than max_seq_length; `counts` is updated. Raises ValueError for an unreadable rendering."""
        array = np.asarray(ids, dtype=np.int64)
        at, found = self.turns(array, conversation.messages, conversation.tools)
        if at is None:
            raise ValueError(found)
        counts["conversations"] += 1
        if len(ids) + 1 <= settings.max_seq_length:
            pieces = [self._document(array, conversation, settings, (at, found))]
        elif settings.long_conversations == "drop":
            pieces = []
        else:
            header = len(found) - (_marked(conversation.messages)[-1] + 1)  # the tools' <|system|>, if any
            pieces = self._pieces(conversation, at, header, len(ids), settings, counts)
            counts["split"] += bool(pieces)
            counts["pieces"] += len(pieces)
        counts["dropped"] += not pieces
        # what the loss counts: a document's first token is never a target
        counts["trained_tokens"] += sum(int(flags[1:].sum()) for _, flags in pieces)
        return pieces

    def _document(self, ids: np.ndarray, conversation: Conversation, settings: ChatSettings, turns=None):
        flags, reason = self.trained(ids, conversation.messages, conversation.tools, settings.train_on, turns)
        if reason:
            raise ValueError(reason)
        return np.append(ids, self.eos).astype(np.uint32), flags

    def _pieces(self, conversation: Conversation, at: np.ndarray, header: int, total: int, settings: ChatSettings,
                counts: dict) -> list:
        """The conversation as pieces of whole rounds that each fit, each piece a conversation of its own.

        Each round's length in the full rendering (from its first marker to the next round's) gives a lower
        bound of a piece's: rendered alone, a piece's last turns may keep thinking the full rendering dropped.
        So the longest piece the bounds allow is rendered, and shortened by a round while it does not fit."""
        messages, limit = conversation.messages, settings.max_seq_length
        lead = 0
        while lead < len(messages) and messages[lead]["role"] == "system":
            lead += 1
        starts = [i for i in range(lead, len(messages)) if messages[i]["role"] == "user" or i == lead]
        if not starts:  # only system messages: nothing to split
            return []
        turn_of = _marked(messages)  # message index -> the index of its marker among the messages' markers
        bounds = [int(at[header + turn_of[i]]) for i in starts] + [total]
        prefix_tokens = bounds[0] + 1  # [gMASK]<sop>, the tools header, the system messages; + EOS
        sizes = np.diff(bounds)
        fits = lambda first, last: prefix_tokens + int(sizes[first:last].sum()) <= limit  # noqa: E731

        def render(first: int, last: int):  # rounds first..last-1 as one conversation: (piece, ids or None)
            piece = Conversation(messages[:lead] + messages[starts[first]:bounds_msg[last]], conversation.tools)
            (ids,) = self.ids([piece])
            return piece, np.asarray(ids, dtype=np.int64) if len(ids) + 1 <= limit else None

        bounds_msg = starts + [len(messages)]
        useful = lambda piece: settings.train_on == "all" or any(  # noqa: E731
            m["role"] == "assistant" for m in piece.messages)
        if settings.train_on == "last_assistant":  # only the end is trained: as much before it as fits
            first = next((f for f in range(len(starts)) if fits(f, len(starts))), len(starts))
            while first < len(starts):
                piece, ids = render(first, len(starts))
                if ids is not None:
                    counts["dropped_rounds"] += first
                    return [self._document(ids, piece, settings)] if useful(piece) else []
                first += 1
            counts["dropped_rounds"] += len(starts)
            return []
        pieces, first = [], 0
        while first < len(starts):
            last = first
            while last < len(starts) and fits(first, last + 1):
                last += 1
            found = None
            while last > first and found is None:
                piece, ids = render(first, last)
                if ids is not None:
                    found = piece, ids
                else:
                    last -= 1
            if found is None:  # the round does not fit on its own
                counts["dropped_rounds"] += 1
                first += 1
                continue
            if useful(found[0]):
                pieces.append(self._document(found[1], found[0], settings))
            first = last
        return pieces


def _marked(messages: list[dict]) -> list[int]:
    """For each message, the index of its role marker among the messages' markers (consecutive tool messages
    share one)."""
    out, turn = [], -1
    for i, m in enumerate(messages):
        if not (m["role"] == "tool" and i and messages[i - 1]["role"] == "tool"):
            turn += 1
        out.append(turn)
    return out


def new_counts() -> dict:
    return dict.fromkeys(COUNTS, 0)
