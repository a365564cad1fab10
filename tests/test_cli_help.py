"""Every command's --help: each option line carries one line of help and its default.

Commands: the console scripts of pyproject.toml ([project.scripts], and each subcommand of
mlan-convert), every python/*.py program, and the modules the README runs with `python -m`.
They run in this process (runpy / the entry function) with sys.argv set, so the whole file
takes a few seconds; a program without argparse would run instead of printing help and fail
the SystemExit(0) check.
"""
import contextlib
import importlib
import io
import os
import re
import runpy
import sys
import tomllib

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROGRAMS = sorted(name for name in os.listdir(os.path.join(ROOT, "python")) if name.endswith(".py"))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
    SCRIPTS = tomllib.load(handle)["project"]["scripts"]
SUBCOMMANDS = {"mlan-convert": ["lavin-to-hf", "hf-to-lavin"]}
MODULES = [("mlan_kernels.training.plot", ["balance"]), ("mlan_bench.render", [])]


def entries(help_text: str) -> list[tuple[str, str]]:
    """(invocation, help) of each argument of an argparse help text: an entry starts on a line
    indented by two spaces, its help follows after a gap of 2+ spaces or on deeper-indented
    continuation lines; any other line (section titles, usage, description) ends it."""
    result = []
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):
            invocation, _, text = line.strip().partition("  ")
            result.append([invocation, [text.strip()]])
        elif line.startswith("   ") and result and result[-1] is not None:
            result[-1][1].append(line.strip())
        else:
            result.append(None)
    return [(entry[0], " ".join(filter(None, entry[1]))) for entry in result if entry]


def check(help_text: str, command: str):
    found = entries(help_text)
    assert found, f"{command}: no arguments found in\n{help_text}"
    problems = []
    for invocation, text in found:
        if invocation.startswith(("-h, --help", "{")):
            continue
        if not text:
            problems.append(f"{command}: no help text: {invocation!r}")
        elif invocation.startswith("-") and "(default" not in text:
            problems.append(f"{command}: no default: {invocation!r}")
    assert not problems, "\n".join(problems)


def run_help(call, argv0, arguments) -> str:
    output = io.StringIO()
    old_argv = sys.argv
    sys.argv = [argv0, *arguments, "--help"]
    try:
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
            call()
    finally:
        sys.argv = old_argv
    assert exit_info.value.code in (0, None), output.getvalue()
    return output.getvalue()


@pytest.mark.parametrize("program", PROGRAMS)
def test_python_program_help(program):
    path = os.path.join(ROOT, "python", program)
    text = run_help(lambda: runpy.run_path(path, run_name="__main__"), path, [])
    assert text.startswith("usage:"), text[:500]
    check(text, f"python/{program}")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help(script):
    module_name, function_name = SCRIPTS[script].split(":")
    main = getattr(importlib.import_module(module_name), function_name)
    for arguments in [[]] + [[name] for name in SUBCOMMANDS.get(script, [])]:
        text = run_help(lambda: sys.exit(main(sys.argv[1:])), script, arguments)
        assert text.startswith("usage: " + script), text[:500]
        check(text, " ".join([script, *arguments]))


@pytest.mark.parametrize("module, subcommands", MODULES)
def test_module_help(module, subcommands):
    for arguments in [[]] + [[name] for name in subcommands]:
        text = run_help(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True),
                        module, arguments)
        check(text, " ".join(["python -m", module, *arguments]))


def test_the_checker_finds_a_missing_default_and_missing_help():
    text = ("usage: x\n\noptions:\n  -h, --help  show this help message and exit\n"
            "  --steps STEPS  optimizer steps\n  --quiet\n")
    with pytest.raises(AssertionError, match="no default: '--steps") as error:
        check(text, "x")
    assert "no help text: '--quiet'" in str(error.value)
