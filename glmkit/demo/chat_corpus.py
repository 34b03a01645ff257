"""A demo chat corpus: conversations about the demo corpus's documents, in the kit's chat format, offline.

Each conversation asks about one document of glmkit/demo/corpus.py and answers from it, in the shapes
real chat data has: a single exchange, a follow-up question, an answer with thinking
(`reasoning_content`), and a tool call (`tools`, an assistant `tool_calls`, the tool's observation, the
answer). The same documents give the same conversations on every run.

    python -m glmkit.demo.chat_corpus --config configs/cpt_chat_replay.yaml

writes every chat source of the config's `paths.data_path` and every chat eval set that names one
`.jsonl` file, from disjoint runs of documents (an eval set never shares a conversation with training).
"""

from __future__ import annotations

import json
import os
import sys

from glmkit.demo.corpus import iter_documents

TOOL = {"type": "function", "function": {
    "name": "python_docs", "description": "Look up the documentation of a Python module, class or function",
    "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}}}
ANSWER_CHARS = 400
OBSERVATION_CHARS = 200


def _topic(text: str) -> str:
    return text.split("\n", 1)[0].strip()[:80]


def _first_sentence(text: str) -> str:
    body = text.split("\n\n", 1)[-1].strip()
    end = body.find(". ")
    return body[: end + 1] if 0 < end < 300 else body[:200]


def conversation(text: str, number: int, answer_chars: int | None = ANSWER_CHARS) -> dict:
    """One conversation about `text`, its shape chosen by `number`; the answer is the text's first `answer_chars`
    characters (None: all of it)."""
    topic, answer = _topic(text), text[:answer_chars].strip()
    shape = number % 4
    if shape == 3:  # a tool call, its observation, the answer
        return {"tools": [TOOL], "messages": [
            {"role": "user", "content": f"Look up {topic} and summarize it."},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "python_docs",
                                                              "arguments": json.dumps({"topic": topic})}}]},
            {"role": "tool", "content": text[:OBSERVATION_CHARS]},
            {"role": "assistant", "content": _first_sentence(text)}]}
    messages = [{"role": "system", "content": "You answer questions about the Python standard library."},
                {"role": "user", "content": f"What is {topic}?"},
                {"role": "assistant", "content": answer}]
    if shape == 1:  # thinking before the answer
        messages[-1]["reasoning_content"] = f"The question is about {topic}; its documentation answers it."
    if shape == 2:  # a follow-up: the first answer becomes history
        messages += [{"role": "user", "content": "And in one sentence?"},
                     {"role": "assistant", "content": _first_sentence(text),
                      "reasoning_content": "Keep only the first sentence."}]
    return {"messages": messages}


def write_chat_corpus(path: str, texts: list[str], first_number: int = 0) -> int:
    """Conversations about `texts` as JSONL, written atomically; the number written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for number, text in enumerate(texts, start=first_number):
            fh.write(json.dumps(conversation(text, number), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(texts)


def chat_targets(cfg) -> list[tuple[str, str]]:
    """(what, path) of every chat source and chat eval set of a config that names one .jsonl file."""
    data = cfg.paths.data_path if isinstance(cfg.paths.data_path, list) else []
    found = [(f"paths.data_path[{i}]", s.path) for i, s in enumerate(data) if s.format == "chat"]
    found += [(f"eval.sets[{i}]", e.path) for i, e in enumerate(cfg.eval.sets) if e.format == "chat"]
    return found


def main(argv=None) -> int:
    import argparse

    from glmkit.config.cli import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(description="Write the demo chat corpus to the chat sources of a config.")
    add_config_arguments(parser)
    parser.add_argument("--docs", type=int, default=300, help="documents (conversations) per training source")
    parser.add_argument("--eval-docs", type=int, default=40, help="documents (conversations) per eval set")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    targets = chat_targets(cfg)
    bad = [f"{what} ({path})" for what, path in targets if not path.endswith(".jsonl") or os.path.isdir(path)]
    if not targets or bad:
        print(f"error: the config needs chat sources (format: chat) that each name one .jsonl file to write; "
              f"{'got ' + ', '.join(bad) if bad else 'it has none'}", file=sys.stderr)
        return 2
    sizes = [args.eval_docs if what.startswith("eval") else args.docs for what, _ in targets]
    texts = list(iter_documents(sum(sizes)))
    start = 0
    for (what, path), size in zip(targets, sizes, strict=True):
        count = write_chat_corpus(path, texts[start:start + size], start)
        print(f"wrote {count} conversations to {path} ({what})")
        start += size
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
