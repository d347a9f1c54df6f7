"""iterate.py's command line: every stage flag reaches its stage, every default is declared once,
and a bad value or choice stops the run in one line before torch loads or anything is written."""
import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from machinery import flags
from tools import sweep

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = ("3", "0.25", "m:f", "x")  # a value of each flag's type that is not its default is among these


def other_value(action):
    """An argument for `action` that is valid and not its default; None for an on/off flag."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return None
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    for text in CANDIDATES:
        try:
            value = action.type(text) if action.type else text
        except argparse.ArgumentTypeError:
            continue
        if value != action.default:
            return text
    raise AssertionError(f"no test value for --{action.dest}")


def user_flags():
    """[(iterate.py's name, stage, the stage's action)] for every stage flag a user sets through iterate.py."""
    return [(name, stage, action) for stage, pairs in flags.STAGE_FLAGS.items() for name, action in pairs if name]


def test_every_stage_flag_reaches_its_stage_and_no_other():
    plumbing = {"generate": dict(model="M", prompts="P", out="O", seed=1), "rank": dict(responses="R", out="O"),
                "train": dict(model="M", ranked="R", out="O", seed=0)}
    names = {name for name, _, _ in user_flags()}
    assert {"beta", "warmup_ratio", "grad_clip", "grad_checkpointing", "cpu_offload", "freeze_embeddings", "dtype",
            "peak_tflops", "judge_max_length", "judge_device", "tensor_parallel_size", "generate_batch_size",
            "rank_batch_size", "p_mode", "backend", "loss_type", "optimizer", "lr_schedule"} <= names
    for name, stage, action in user_flags():
        value = other_value(action)
        if value is None:  # on/off: the opposite of the default, as --flag or --no-flag
            given, expected = ([f"--no-{name}"], [f"--no-{action.dest}"]) if action.default else ([f"--{name}"], [f"--{action.dest}"])
        else:
            given = [f"--{name}", value]
            expected = [f"--{action.dest}", str(action.type(value) if action.type else value)]
        together = ["--max_prompt_length", "1"] if name == "max_length" else []  # it must stay above this one
        args = flags.iterate_args(["--model", "M", "--prompts", "P", "--judge", "pairrm"] + given + together)
        for other, pairs in flags.STAGE_FLAGS.items():
            argv = [str(a) for a in flags.stage_argv(other, args, **plumbing[other])]
            found = expected in [argv[i:i + len(expected)] for i in range(len(argv))]
            assert found == (name in [n for n, _ in pairs]), (name, other, argv)  # in each stage that has it, only there


def test_dry_run_shows_the_forwarded_flags(tmp_path):
    res = subprocess.run([sys.executable, "iterate.py", "--dry-run", "--run_dir", str(tmp_path / "r"), "--iterations", "1",
                          "--beta", "0.3", "--warmup_ratio", "0.2", "--grad_clip", "0.5", "--freeze_embeddings",
                          "--generate_batch_size", "3", "--rank_batch_size", "5", "--dtype", "float32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    commands = {Path(line.split()[2]).stem: line.split()[3:] for line in res.stdout.splitlines() if line.startswith("+ ")}

    def value(stage, flag):
        argv = commands[stage]
        return argv[argv.index(flag) + 1] if flag in argv else None
    assert value("train", "--beta") == "0.3" and value("train", "--warmup_ratio") == "0.2"
    assert value("train", "--grad_clip") == "0.5" and "--freeze_embeddings" in commands["train"]
    assert value("generate", "--batch_size") == "3" and value("rank", "--batch_size") == "5"
    assert value("generate", "--dtype") == value("train", "--dtype") == "float32"  # one flag, two stages
    toy = flags.PRESETS["toy"]  # the default preset's values reach the stages
    assert value("train", "--eta") == str(toy["eta"]) and value("generate", "--max_new_tokens") == str(toy["max_new_tokens"])
    assert not (tmp_path / "r").exists()


def test_magnet_is_pi_0_in_every_iteration(tmp_path):
    """--loss_type magnet: every iteration's train.py gets --magnet pi_0 (the run's first model) and
    --tau; with any other loss type no --magnet is given."""
    def train_commands(*extra):
        res = subprocess.run([sys.executable, "iterate.py", "--dry-run", "--run_dir", str(tmp_path / "r"),
                              "--iterations", "3", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return [line.split()[3:] for line in res.stdout.splitlines() if line.startswith("+ ") and "train.py" in line]
    magnet = train_commands("--loss_type", "magnet", "--tau", "0.03")
    pi_0 = magnet[0][magnet[0].index("--model") + 1]
    assert len(magnet) == 3 and magnet[1][magnet[1].index("--model") + 1] != pi_0
    for argv in magnet:
        assert argv[argv.index("--magnet") + 1] == pi_0 and argv[argv.index("--tau") + 1] == "0.03"
    assert not any("--magnet" in argv for argv in train_commands())


def test_no_eval_every_iteration_exports_pi_0_and_the_last_policy_only(tmp_path):
    def exported(*extra):
        res = subprocess.run([sys.executable, "iterate.py", "--dry-run", "--run_dir", str(tmp_path / "r"), "--iterations",
                              "3", "--eval_prompts", str(tmp_path / "eval.jsonl"), "--eval_best_of", "2", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        outs = [Path(line.split()[line.split().index("--out") + 1]) for line in res.stdout.splitlines()
                if line.startswith("+ ") and "generate.py" in line]
        return sorted(f"{out.parent.name}/{out.name}" for out in outs if out.name.startswith("eval"))
    kinds = ("eval_best_of_2_responses.jsonl", "eval_responses.jsonl")
    assert exported() == [f"iter{t}/{kind}" for t in range(4) for kind in kinds]
    assert exported("--no-eval_every_iteration") == [f"iter{t}/{kind}" for t in (0, 3) for kind in kinds]


# every choice of iterate.py, given a typo
CHOICE_TYPOS = [("--loss_type", "sppoo"), ("--optimizer", "adam"), ("--lr_schedule", "cosine"), ("--p_mode", "pair"),
                ("--backend", "vlm"), ("--preset", "toys"), ("--prompt_format", "chats"), ("--dtype", "fp16"),
                ("--judge_prompt", "templat"), ("--judge", "pairmr"), ("--K", "0"), ("--no-such-flag", "1")]


@pytest.mark.parametrize("flag,value", CHOICE_TYPOS, ids=[f[0] for f in CHOICE_TYPOS])
def test_a_bad_choice_fails_in_one_line_before_torch_loads_or_anything_is_written(tmp_path, flag, value):
    run_dir = tmp_path / "run"
    probe = (f"import sys, iterate\ntry:\n    iterate.main({[flag, value, '--run_dir', str(run_dir)]!r})\n"
             "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["2", "False"], (res.stdout, res.stderr)  # exit 2, torch never imported
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iterate.py: error: ") and f"{flag}" in lines[0] and value in lines[0], res.stderr
    assert not run_dir.exists()


def test_each_default_is_declared_once():
    ap = flags.iterate_parser()
    actions = {a.dest: a for a in ap._actions}
    # a stage flag's default in iterate.py is the stage parser's, not a second declaration
    for name, stage, action in user_flags():
        assert ap.get_default(name) == action.default, (name, stage)
        assert actions[name].choices == action.choices and actions[name].type == action.type
    # one flag for two stages only where both stages mean the same: same type, choices, default
    by_name = {}
    for name, stage, action in user_flags():
        by_name.setdefault(name, []).append(action)
    shared = {name: a for name, a in by_name.items() if len(a) > 1}
    assert set(shared) == {"prompt_format", "dtype"}
    for name, (a, b) in shared.items():
        assert (a.type, a.choices, a.default) == (b.type, b.choices, b.default), name
    # a preset names only real flags and changes each value it lists
    for preset, values in flags.PRESETS.items():
        for key, value in values.items():
            assert key in actions, (preset, key)
            assert value != ap.get_default(key), f"PRESETS[{preset!r}][{key!r}] = {value!r} restates the default"


def test_presets_apply_under_the_command_line():
    args = flags.iterate_args(["--run_dir", "x"])  # toy
    assert (args.eta, args.K, args.temperature, args.warmup_ratio) == (10.0, 5, 1.0, 0.1)  # preset, stage defaults
    args = flags.iterate_args(["--preset", "mistral-7b", "--no-grad_checkpointing", "--K", "3"])
    assert args.grad_checkpointing is False and args.K == 3 and args.temperature == 0.7 and args.eta == 1000.0
    assert args.model == "mistralai/Mistral-7B-Instruct-v0.2" and args.backend == "vllm" and args.micro_batch == 8
    assert flags.iterate_args(["--preset", "gemma-2-9b"]).micro_batch == 4


def test_sweep_grids_on_off_flags():
    grid = sweep.parse_grid(["freeze_embeddings=true,false", "grad_checkpointing=true"])
    got = [c["args"] for c in sweep.cells(grid, [0], ["--preset", "toy"])]
    assert got == [["--preset", "toy", "--freeze_embeddings", "--grad_checkpointing", "--seed", "0"],
                   ["--preset", "toy", "--no-freeze_embeddings", "--grad_checkpointing", "--seed", "0"]]
    assert [flags.iterate_args(a).freeze_embeddings for a in got] == [True, False]
    with pytest.raises(sweep.InputError, match="on or off"):
        sweep.parse_grid(["freeze_embeddings=yes"])


def test_sweep_checks_every_cell_before_running_one(tmp_path):
    res = subprocess.run([sys.executable, "-m", "tools.sweep", "--out", str(tmp_path / "s"), "--grid", "loss_type=sppo,sppoo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice: 'sppoo'" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_stage_parsers_load_without_torch():
    res = subprocess.run([sys.executable, "-c", "import sys, machinery.flags, iterate, machinery.records, machinery.launch, machinery.lm, tools.sweep; "
                          "print(sorted(m for m in sys.modules "
                          "if m.split('.')[0] in ('torch', 'transformers', 'datasets')))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert json.loads(res.stdout.replace("'", '"')) == [], res.stderr


def project_imports():
    """{module: the project's modules it imports} for every module of the project, read from its source."""
    files = {str(p.relative_to(ROOT).with_suffix("")).replace("/", "."): p
             for p in [*ROOT.glob("*.py"), *ROOT.glob("machinery/*.py"), *ROOT.glob("worlds/*.py"), *ROOT.glob("theory/*.py"), *ROOT.glob("tools/*.py")]}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_imports_point_one_way():
    """The math and the command lines import nothing of the project; no two modules import each other,
    directly or around a cycle, so every module can be read knowing only the ones below it."""
    graph = project_imports()
    # the top level is the design: the four stages and the loss; everything else is in a package
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["generate.py", "iterate.py", "rank.py", "sppo_loss.py", "train.py"]
    assert graph["machinery.flags"] == set() and graph["sppo_loss"] == set(), graph
    assert {"generate", "rank", "train", "iterate", "machinery.lm", "machinery.records", "machinery.launch", "worlds.toy"} <= set(graph)
    done, path = set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        if m not in done:
            path.append(m)
            for n in graph[m]:
                visit(n)
            path.pop()
            done.add(m)
    for m in graph:
        visit(m)


def source_lines(path):
    """{name: lines} of a module's top-level functions and classes (decorators, signature, docstring
    and body), and "the docstring": the module docstring's lines."""
    tree = ast.parse(path.read_text())
    lines = {node.name: node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
             for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    if ast.get_docstring(tree) is not None:
        lines["the docstring"] = tree.body[0].end_lineno - tree.body[0].lineno + 1
    return lines


def test_readme_reading_order_is_what_the_source_holds():
    """The README's reading order names files and functions that exist, with their line counts as
    the source has them now, and states how many files and lines in all: edited code that changes a
    count fails here until the README says the new one."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reading order for one SPPO iteration\n")[1].split("\n## ")[0]
    items = re.findall(r"^\d+\. `([\w/]+\.py)`: ([^()]+?) \((\d+) lines\)", section, flags=re.M)
    assert items, section
    total = 0
    for path, listed, stated in items:
        lines = source_lines(ROOT / path)
        names = [re.sub(r"`", "", n.strip()) for n in listed.split(",")]
        assert set(names) <= set(lines), (path, set(names) - set(lines))
        counted = sum(lines[n] for n in names)
        assert counted == int(stated), f"README: {path} {names} ({stated} lines); the source has {counted}"
        total += counted
    files, lines_in_all = re.search(r"^(\w+) files, [^:]*: (\d+) lines", section, flags=re.M).groups()
    words = ["one", "two", "three", "four", "five", "six"]
    assert files.lower() in words and words.index(files.lower()) + 1 == len(items) == len({p for p, _, _ in items})
    assert int(lines_in_all) == total <= 460, (lines_in_all, total)
