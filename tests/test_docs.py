"""The docs stay true to the kit: every relative link resolves, every flag of a documented command exists.

Read from the Markdown itself: links (files and #anchors, with GitHub's heading slugs) between the README,
docs/*.md, CONTRIBUTING.md and bench/README.md; commands in code blocks and inline code that run the kit's
scripts, checked against each script's own option parser (argparse's --help for the Python scripts, the `case`
patterns of the shell runbooks, the Makefile's targets, bench/run_all.sh's list). Nothing is trained.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md",
               *(ROOT / "docs").glob("*.md")])
PYTHON_SCRIPTS = ("train_qlora.py", "use_adapter.py", "download_model.py", "training_dashboard.py")
SHELL_SCRIPTS = ("launch_training.sh", "launch_dashboard.sh")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def split_code(text: str) -> tuple[str, list[str]]:
    """(the prose with code removed, the code: each fenced line, backslash continuations joined, and each span)."""
    code = []
    for block in FENCE.findall(text):
        code += [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    prose = FENCE.sub("", text)
    code += INLINE_CODE.findall(prose)
    return INLINE_CODE.sub("", prose), code


# ---------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: pathlib.Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def test_the_docs_are_where_the_readme_says():
    names = {rel(p) for p in DOCS}
    assert {"README.md", "CONTRIBUTING.md", "bench/README.md", "docs/CONFIGURATION.md", "docs/TROUBLESHOOTING.md",
            "docs/LOGS.md", "docs/SCALING.md", "docs/BENCHMARKS.md"} <= names
    readme, _ = split_code((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {os.path.normpath(target.split("#")[0]) for target in LINK.findall(readme)}
    assert not {rel(p) for p in DOCS if p.parent == ROOT / "docs"} - linked, "the README's docs table misses a page"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relative_link_resolves(doc):
    prose, _ = split_code(doc.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no heading with that anchor in {rel(path)}")
    assert not broken, f"{rel(doc)}: " + "; ".join(broken)


def test_docs_named_in_the_code_exist():
    """Messages, help texts and config comments point at docs pages; a renamed page must take them along."""
    sources = [*ROOT.glob("*.py"), *ROOT.glob("*.sh"), *ROOT.glob("*.yaml"), *(ROOT / "glmkit").rglob("*.py"),
               *(ROOT / "configs").rglob("*.yaml"), *(ROOT / "bench").glob("*.py"), *(ROOT / "examples").iterdir()]
    named = {(rel(src), name) for src in sources for name in re.findall(r"docs/[A-Z_]+\.md", src.read_text("utf-8"))}
    assert named, "no docs page is named anywhere: the pattern is wrong"
    assert not {pair for pair in named if not (ROOT / pair[1]).is_file()}


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def help_flags(*scripts: str) -> dict[str, frozenset[str]]:
    """Each script's options, from its own argparse --help (started all at once: some import torch first)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / name), "--help"], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in scripts}
    flags = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} --help: {err}"
        flags[name] = frozenset(FLAG.findall(out))
    return flags


def python_flags() -> dict[str, frozenset[str]]:
    return help_flags(*PYTHON_SCRIPTS)


def shell_flags(name: str) -> frozenset[str]:
    """A runbook's options: the `--flag)` patterns of its argument `case`."""
    patterns = re.findall(r"^\s*((?:-[-\w]*(?:=\*)?\|?)+)\)", (ROOT / name).read_text(encoding="utf-8"), re.M)
    return frozenset(p.removesuffix("=*") for group in patterns for p in group.split("|") if p.startswith("--"))


def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))


def bench_names() -> list[str]:
    text = (ROOT / "bench" / "run_all.sh").read_text(encoding="utf-8")
    return re.search(r"^ALL=\((.*?)\)", text, re.S | re.M).group(1).split()


def commands(doc: pathlib.Path) -> list[str]:
    """Each piece of code in the doc, its comment cut off and split at && and ; into single commands."""
    _, code = split_code(doc.read_text(encoding="utf-8"))
    found = []
    for piece in code:
        piece = re.sub(r"^\$ ", "", piece)
        piece = re.split(r"(?:^|\s)#\s", piece)[0]
        found += [part.strip() for part in re.split(r"&&|;|\s\|\s", piece) if part.strip()]
    return found


def unknown_flags(command: str) -> list[str]:
    """The flags of one command that the command it runs does not take ([] for commands this test does not know)."""
    tokens = command.split()
    for i, token in enumerate(tokens):
        name = token.rsplit("/", 1)[-1]
        rest = tokens[i + 1:]
        if name in PYTHON_SCRIPTS:
            return [f for f in FLAG.findall(" ".join(rest)) if f not in python_flags()[name]]
        if name in SHELL_SCRIPTS and not token.endswith(":"):
            args = " ".join(rest)  # the launcher's options, then after a lone -- the trainer's
            launcher, _, trainer = ("", "", args[3:]) if args.startswith("-- ") else args.partition(" -- ")
            bad = [f for f in FLAG.findall(launcher) if f not in shell_flags(name)]
            return bad + [f for f in FLAG.findall(trainer) if f not in python_flags()["train_qlora.py"]]
        if re.fullmatch(r"bench_\w+\.py", name) or name in ("gpu_fit.py", "gpu_layers.py", "midmodel.py"):
            if not (ROOT / "bench" / name).is_file():
                return [f"(no script {token})"]
            return [f for f in FLAG.findall(" ".join(rest)) if f not in help_flags(f"bench/{name}")[f"bench/{name}"]]
        if name == "run_all.sh":
            return [f"(no benchmark {n})" for n in rest if n not in bench_names() + ["gpu_smoke"]]
        if token == "make" and i == 0:
            return [f"(no target {t})" for t in rest[:1] if t not in make_targets()]
    return []


def test_every_documented_flag_exists():
    checked, problems = set(), []
    for doc in DOCS:
        for command in commands(doc):
            for name in (*PYTHON_SCRIPTS, *SHELL_SCRIPTS, "make", "run_all.sh"):
                if re.search(rf"(^|[\s/]){re.escape(name)}(\s|$)", command):
                    checked.add(name)
            problems += [f"{rel(doc)}: `{command}`: {flag}" for flag in unknown_flags(command)]
    # The check cannot pass by finding nothing: every script the README's workflow runs is documented somewhere.
    assert checked >= {*PYTHON_SCRIPTS, *SHELL_SCRIPTS, "make", "run_all.sh"}, checked
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should():
    assert slug("FSDP: GLM-4.6 / GLM-4.5 on one node, bigger micro-batches for Air") == \
        "fsdp-glm-46--glm-45-on-one-node-bigger-micro-batches-for-air"
    assert slug("`training_log.jsonl`") == "training_logjsonl" and slug("**Four** [promises](x.md)") == "four-promises"
    assert unknown_flags("python train_qlora.py --plan --no-such-flag") == ["--no-such-flag"]
    assert unknown_flags("./launch_training.sh --force -- --allow-data-change --frobnicate") == ["--frobnicate"]
    assert unknown_flags("./launch_training.sh --allow-data-change") == ["--allow-data-change"]  # a trainer flag
    assert unknown_flags("make no-such-target") == ["(no target no-such-target)"]
    assert unknown_flags("bench/run_all.sh loading nope") == ["(no benchmark nope)"]
    assert {"--config", "--logs", "--host", "--port", "--no-auth", "--output-dir"} <= shell_flags("launch_dashboard.sh")


# ---------------------------------------------------------------------------
# Shape
# ---------------------------------------------------------------------------

def test_the_readme_stays_short_and_tables_stay_readable():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
    long_cells = [f"{rel(doc)}: {cell.strip()[:60]}... ({len(cell)} characters)" for doc in DOCS
                  for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("|")
                  for cell in line.split("|") if len(cell) > 1000]
    assert not long_cells, long_cells


def test_run_all_runs_every_benchmark_and_bench_readme_names_each():
    scripts = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))
    assert sorted(bench_names()) == scripts
    listed = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    assert not [name for name in [*scripts, "gpu_smoke"] if f"| `{name}` |" not in listed]


def console_examples() -> list[tuple[str, str, str]]:
    """(doc, command, the output it documents) for every `$ python train_qlora.py --plan ...` console example."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text(encoding="utf-8")):
            lines = block.splitlines()
            for index, line in enumerate(lines):
                if line.startswith("$ python train_qlora.py") and "--plan" in line:
                    shown = []
                    for following in lines[index + 1:]:
                        if following.startswith("$ "):
                            break
                        shown.append(following)
                    found.append((rel(doc), line[2:], "\n".join(shown).strip()))
    return found


# Runs each command's script as `python script args` does (run as __main__, its exit caught), one after another in
# one interpreter: the examples' outputs for the price of one start-up (torch and transformers: ~3 s each).
RUN_EACH = """
import contextlib, io, json, runpy, sys
printed = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit:
            pass
    printed.append([out.getvalue(), err.getvalue()])
sys.__stdout__.write(json.dumps(printed))
"""


@pytest.fixture(scope="module")
def plan_outputs() -> dict[str, tuple[str, str]]:
    """{command: (stdout, stderr)} of every documented `--plan` example."""
    commands = sorted({command for _, command, _ in console_examples()})
    argvs = [command.split(" | ")[0].split()[1:] for command in commands]  # python <script> args..., piped or not
    result = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(commands, map(tuple, json.loads(result.stdout))))


@pytest.mark.parametrize("doc, command, shown", console_examples())
def test_every_plan_example_prints_what_the_docs_show(doc, command, shown, plan_outputs):
    """`--plan` needs no weights and no GPU: each documented example is run and its output compared, line for line
    (on a machine with GPUs the plan reads them instead of assuming the recipe's node, so this checks CPU only)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the documented plans are the ones made without GPUs")
    stdout, stderr = plan_outputs[command]
    printed = (stdout + stderr).strip()
    if " | tail -" in command:  # a pipe passes stdout on
        printed = "\n".join(stdout.strip().splitlines()[-int(command.rsplit("tail -", 1)[1]):])
    assert printed == shown, f"{doc}: {command}"
