"""Helpers every stage shares: checked JSONL I/O, atomic writes, chat templating, log-probs,
and the split of a stage's records over torchrun's processes.

Kept small on purpose: one place for each idea that more than one stage needs. torch, transformers
and datasets are imported in the functions that use them: importing this module takes
milliseconds, so iterate.py and sweep.py check their command line before torch loads (~3 s).
"""
import argparse
import contextlib
import fcntl
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path


# ---- errors and checked JSONL ----------------------------------------------------------------


class InputError(ValueError):
    """Bad input; the message names file, line and field. Stages exit non-zero with it."""


def _fail(path, line_no, field, msg):
    where = f"{path}:{line_no}" if line_no else str(path)
    raise InputError(f"{where}: field {field!r}: {msg}" if field else f"{where}: {msg}")


CHAT_ROLES = ("system", "user", "assistant")
P_TOLERANCE = 1e-6  # P + P^T = 1, diagonal 1/2, win rate = row mean: up to rounding of the written floats


def _check_prompt(prompt, path, line_no):
    """A prompt is a non-blank string, or chat messages that end on a non-blank user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            _fail(path, line_no, "prompt", "empty or only whitespace")
        return
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt)):
        _fail(path, line_no, "prompt", "expected a string or a list of {role, content} messages")
    for n, m in enumerate(prompt):
        if m["role"] not in CHAT_ROLES:
            _fail(path, line_no, "prompt", f"message {n}: unknown role {m['role']!r} (expected one of {CHAT_ROLES})")
    if prompt[-1]["role"] != "user":
        _fail(path, line_no, "prompt", f"the last message is a {prompt[-1]['role']!r} turn; it must be the user's")
    if not prompt[-1]["content"].strip():
        _fail(path, line_no, "prompt", "the last user message is empty or only whitespace")


def _check_record(rec, path, line_no, stage, K):
    """Check one record for `stage` in ("prompts", "responses", "ranked"); returns its K."""
    if not isinstance(rec, dict):
        _fail(path, line_no, None, f"expected a JSON object, got {type(rec).__name__}")
    for field in ("id", "prompt"):
        if field not in rec:
            _fail(path, line_no, field, "missing")
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        _fail(path, line_no, "id", f"expected a string or integer, got {rec['id']!r}")
    _check_prompt(rec["prompt"], path, line_no)
    if stage == "prompts":
        return K
    responses = rec.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        _fail(path, line_no, "responses", "missing or not a list of strings")
    if K is None and len(responses) < 2:  # SPPO compares K >= 2; one sample (K=1) only where asked for
        _fail(path, line_no, "responses", f"need K >= 2 responses, got {len(responses)}")
    if K is not None and len(responses) != K:
        _fail(path, line_no, "responses", f"K mismatch: {len(responses)} responses, expected K={K}")
    K = len(responses)
    truncated = rec.get("truncated", [False] * K)
    if not isinstance(truncated, list) or len(truncated) != K or not all(isinstance(t, bool) for t in truncated):
        _fail(path, line_no, "truncated", f"expected a list of K={K} booleans")
    if stage == "responses":
        return K
    P = rec.get("P")
    if not (isinstance(P, list) and len(P) == K and all(isinstance(row, list) and len(row) == K for row in P)):
        _fail(path, line_no, "P", f"missing or not a {K} x {K} matrix")
    for row in P:
        for p in row:
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                _fail(path, line_no, "P", f"entry {p!r} is not a probability in [0, 1]")
    problem = preference_matrix_problem(P)
    if problem:
        _fail(path, line_no, "P", problem)
    win = rec.get("win_rate")
    if not (isinstance(win, list) and len(win) == K and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0.0 <= w <= 1.0 for w in win)):
        _fail(path, line_no, "win_rate", f"missing or not a list of K={K} numbers in [0, 1]")
    for i, (w, row) in enumerate(zip(win, P)):
        if abs(w - sum(row) / K) > P_TOLERANCE:
            _fail(path, line_no, "win_rate", f"entry {i} is {w!r}, but the mean of row {i} of P is {sum(row) / K!r}")
    return K


def preference_matrix_problem(P):
    """What makes P (K x K nested lists, entries in [0, 1]) not a preference matrix, or None.

    P[i][j] = P(y_i > y_j): a tie counts half, so P[i][i] = 1/2 and P[i][j] + P[j][i] = 1.
    """
    for i in range(len(P)):
        if abs(P[i][i] - 0.5) > P_TOLERANCE:
            return f"diagonal entry [{i}][{i}] is {P[i][i]!r}, not 1/2"
        for j in range(i + 1, len(P)):
            if abs(P[i][j] + P[j][i] - 1.0) > P_TOLERANCE:
                return f"P[{i}][{j}] + P[{j}][{i}] = {P[i][j] + P[j][i]!r}, not 1 (P(y_i > y_j) + P(y_j > y_i) must be 1)"
    return None


def _parse_json_line(line, path, line_no):
    def no_constant(name):  # Python's json reads NaN and Infinity; JSON has neither
        raise ValueError(f"{name} is not valid JSON")
    try:
        return json.loads(line, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        _fail(path, line_no, None, f"malformed JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        _fail(path, line_no, None, "malformed JSON (nested too deeply)")
    except ValueError as e:  # NaN / Infinity, or an integer too long to convert
        _fail(path, line_no, None, f"malformed JSON ({e})")


def record_line(path, index) -> int:
    """The line number of record `index` of a JSONL file read by read_records (blank lines skipped)."""
    with open(path, "rb") as f:
        lines = [n for n, raw in enumerate(f, 1) if raw.decode("utf-8", "replace").strip()]
    return lines[index]


def read_records(path, stage="prompts", K=None):
    """Read and check a stage's JSONL file: one record per prompt, ids unique.

    stage: "prompts" (id, prompt), "responses" (+ responses, truncated), "ranked" (+ P, win_rate).
    All records must share one K >= 2, or the K given (K=1: an evaluation's one sample per prompt).
    Unknown fields are kept as they are.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    records, seen = [], set()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(path, line_no, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            if not line.strip():
                continue
            rec = _parse_json_line(line, path, line_no)
            K = _check_record(rec, path, line_no, stage, K)
            # ids are compared as text: they name seeds and shards, where 1 and "1" are the same
            if str(rec["id"]) in seen:
                _fail(path, line_no, "id", f"duplicate id {rec['id']!r} (ids are compared as text)")
            seen.add(str(rec["id"]))
            records.append(rec)
    if not records:
        raise InputError(f"{path}: no records")
    return records


def load_prompts(source, split="train", column="prompt"):
    """Prompt records {id, prompt, ...} from a JSONL file, a JSON list (`read_json_prompts`: AlpacaEval's
    eval set), a directory saved by `datasets` (`save_to_disk`), or a hub dataset name (the only case
    that touches the network).

    Dataset rows keep all their columns; the prompt is taken from `column` (a string or a list
    of chat messages) and the id from "id" or "prompt_id" when present, else "<source>-<row>".
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return read_json_prompts(path, column)
    if path.is_file():
        return read_records(path, stage="prompts")
    import datasets
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise InputError(f"{source}: a directory, but not a dataset saved with save_to_disk ({e})") from e
    else:
        data = datasets.load_dataset(str(source), split=split)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"{source}: no split {split!r} (has {sorted(data)})")
        data = data[split]
    if column not in data.column_names:
        raise InputError(f"{source}: field {column!r}: missing (columns: {data.column_names})")
    records = []
    for row_no, row in enumerate(data):
        rec = dict(row, prompt=row[column])
        rec["id"] = row.get("id", row.get("prompt_id", f"{path.name}-{row_no}"))
        _check_record(rec, source, f"row {row_no}", "prompts", None)
        records.append(rec)
    if len({str(r["id"]) for r in records}) != len(records):
        raise InputError(f"{source}: field 'id': ids are not unique")
    return records


def read_json_prompts(path, column="prompt"):
    """Prompt records from a JSON list of objects, e.g. AlpacaEval's own eval set (alpaca_eval.json:
    instruction, output, generator, dataset). The prompt is the `column` field, or "instruction"
    in rows without it; ids from "id", else "<file stem>-<index>". The reference answer's "output"
    and "generator" are dropped: they describe another model's answer, not the prompt."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        _fail(path, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(rows, list) or not rows:
        _fail(path, None, None, "expected a non-empty JSON list of objects (or a .jsonl file)")
    records = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            _fail(path, f"item {n}", None, f"expected a JSON object, got {type(row).__name__}")
        field = column if column in row else "instruction"
        if field not in row:
            _fail(path, f"item {n}", column, "missing (and no 'instruction')")
        rec = {k: v for k, v in row.items() if k not in ("output", "generator")}
        rec.update(prompt=row[field], id=row.get("id", f"{Path(path).stem}-{n}"))
        _check_record(rec, path, f"item {n}", "prompts", None)
        records.append(rec)
    if len({r["id"] for r in records}) != len(records):
        raise InputError(f"{path}: field 'id': ids are not unique")
    return records


def atomic_write(path, write_fn, mode="w"):
    """Write through `write_fn(file)` to a temporary file, then rename: never half-written.

    Temporaries of `path` left by writers that were killed (their pid is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(path):
    """Delete `.NAME.tmpPID` files next to `path` whose writer (PID, on this machine) is gone."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = tmp.name[len(path.name) + 5:]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


BUILT = "done"  # the file that marks a directory of build_once as complete


@contextlib.contextmanager
def build_once(out_dir):
    """Build the directory out_dir once, however many processes try at the same time.

    Yields None if out_dir is built already (it holds the file BUILT); else an empty temporary
    directory next to it to build in, which becomes out_dir when the block ends without an error.
    A lock file beside it makes a second builder wait for the first, then find out_dir built; the
    kernel drops the lock of a killed builder, and the next one deletes its half-built directory.
    An out_dir that holds files but no BUILT is refused, not replaced.
    """
    out_dir = Path(out_dir)
    if (out_dir / BUILT).exists():
        yield None
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process builds
        if (out_dir / BUILT).exists():  # it did
            yield None
            return
        if out_dir.exists() and any(out_dir.iterdir()):
            raise InputError(f"{out_dir}: exists and holds no finished build (no {BUILT!r} file); "
                             "delete it or give another directory")
        for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp*"):  # a killed builder's
            shutil.rmtree(stale)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
        tmp.mkdir()
        try:
            yield tmp
            (tmp / BUILT).write_text("ok\n")
            os.replace(tmp, out_dir)  # onto nothing, or onto the empty directory checked above
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """Where what is built once per machine lives (the converted real LM, the built-in worlds):
    $SPPO_CACHE, else ~/.cache/sppo (outside the repo)."""
    return Path(os.environ.get("SPPO_CACHE") or Path.home() / ".cache" / "sppo")


def write_records(path, records):
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def run_info(config: dict) -> dict:
    """What a run directory records: the full config, seeds in it, library versions, host."""
    import tokenizers
    import torch
    import transformers
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    for name in ("datasets", "numpy", "vllm", "llm_blender"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return {"config": config, "argv": sys.argv, "versions": versions, "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def fail_with(e: Exception):
    """Exit non-zero with one clear line: what scripts do with an InputError."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


# ---- flags and paths, checked before any work ----------------------------------------------------
# argparse types: a bad value stops the stage at parse time with "argument --flag: expected ...", exit 2


def _number_type(cast, ok, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _number_type(int, lambda v: v > 0, "an integer > 0")
nonneg_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _number_type(float, lambda v: True, "a finite number")
positive_float = _number_type(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number_type(float, lambda v: v >= 0, "a finite number >= 0")
probability = _number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def check_output(path, flag="--out", directory=False):
    """Refuse an output path that cannot be written, before the work rather than after it."""
    path = Path(path).absolute()
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a directory")
    if not directory and path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a file name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {ancestor} is not writable")


def check_model_path(name, flag="--model"):
    """A local model directory must hold config.json; anything that is not a local path is a hub name."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {name}: not a directory")
        if not (path / "config.json").is_file():
            raise InputError(f"{flag} {name}: no config.json in it: not a model directory")
    elif str(name).startswith((".", "/", "~")) or str(name).count("/") > 1:
        raise InputError(f"{flag} {name}: directory not found")


def path_stamp(name):
    """A cheap version stamp of a local file or directory: (file, size, mtime) of each of its files;
    anything else (a hub name) as it is. Keys of reusable work include it."""
    path = Path(name)
    if not path.exists():
        return str(name)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def watch_launcher(poll=0.5):
    """Exit as soon as the process that launched this one is gone.

    torchrun starts every rank in a session of its own, so killing the launcher's process group
    leaves the ranks running: they hang at a collective or race a re-run for the same outputs.
    Under torchrun (TORCHELASTIC_RUN_ID) a thread watches the parent; under iterate.py also
    iterate.py itself (SPPO_LAUNCHER_PID), which sits above torchrun. A plain process started by
    hand is never watched (it may outlive its shell on purpose).
    """
    launcher = os.environ.get("SPPO_LAUNCHER_PID")
    if "TORCHELASTIC_RUN_ID" not in os.environ and not launcher:
        return
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll)
            if os.getppid() != parent or (launcher and not pid_alive(int(launcher))):
                print(f"error: the launcher of process {os.getpid()} is gone; exiting", file=sys.stderr, flush=True)
                os._exit(1)
    threading.Thread(target=watch, name="watch_launcher", daemon=True).start()


# ---- model I/O and tokens ---------------------------------------------------------------------


_TOKENIZERS = {}  # (directory, its tokenizer files' contents) -> the tokenizer loaded from them, in this process


def load_tokenizer(model_dir):
    """The model directory's tokenizer, with a pad token. Loaded once per process per directory
    and file contents: Gemma-3's (262,144 tokens) takes 6-9 s to load, and an iteration's stages
    in iterate.py's process read the same directory up to three times; they share the object,
    so none may change it. (Per directory, not per contents: `name_or_path` stays true.)"""
    from transformers import AutoTokenizer
    files = sorted(p for p in Path(model_dir).glob("*") if p.is_file() and (
        p.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template", "vocab", "merges", "spiece"))))
    key = (str(Path(model_dir).resolve()), *((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files))
    if files and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: could not load a tokenizer ({str(e).strip().splitlines()[0]})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if files:  # (a hub name has no local files: loaded each time, from the hub's own cache)
        _TOKENIZERS[key] = tok
    return tok


def load_model(model_dir, dtype=None, device="cpu"):
    """An HF causal LM from a directory or hub name (float32 unless `dtype`); safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    return model.to(device)


PROMPT_FORMATS = ("auto", "chat", "plain")


def prompt_token_ids(tokenizer, prompt, prompt_format="auto") -> list:
    """Token ids of a prompt ready for the model's answer.

    chat: through the chat template, tokenised by the template itself (no string surgery), so a
    prompt is never cut and BOS appears once, where the template puts it.
    plain: BOS (once, if the tokenizer has one) + the prompt text's tokens; the response is the
    model's continuation of the text: how a base model is prompted.
    auto: chat if the tokenizer has a chat template, else plain.
    User text never becomes a control token: "<|eos|>" typed in a prompt stays those characters
    (`split_special_tokens`; in a chat prompt, `_plain_content_ids`).
    """
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(f"unknown prompt format {prompt_format!r}; choose from {PROMPT_FORMATS}")
    if prompt_format == "plain" or (prompt_format == "auto" and tokenizer.chat_template is None):
        if not isinstance(prompt, str):
            raise InputError("a chat-format prompt needs a tokenizer with a chat template (and --prompt_format chat)")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if tokenizer.chat_template is None:
        raise InputError("--prompt_format chat: the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if any(c in m["content"] for m in messages for c in control_strings(tokenizer)):
        return _plain_content_ids(tokenizer, messages)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


@functools.lru_cache(maxsize=8)
def control_strings(tokenizer) -> tuple:
    """The texts of the tokenizer's special tokens (Gemma has thousands: worked out once)."""
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)


def _plain_content_ids(tokenizer, messages) -> list:
    """The chat template's ids with each message's content tokenised as plain text.

    The template is rendered with a placeholder per message; its own text (control tokens
    included) is tokenised as usual, each content with `split_special_tokens`. Used only for
    content that holds a control string, so every other prompt keeps the template's exact ids.
    """
    marks = [f"\ue000{n}\ue001" for n in range(len(messages))]
    text = tokenizer.apply_chat_template([dict(m, content=k) for m, k in zip(messages, marks)],
                                         add_generation_prompt=True, tokenize=False)
    parts = re.split("\ue000(\\d+)\ue001", text)  # template, message index, template, ...
    for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
        full = "".join(contents[int(p)] if n % 2 else p for n, p in enumerate(parts))
        if full == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False):
            break  # the template inserts the contents as they are (or stripped, as Gemma's does)
    else:
        raise InputError("the prompt holds the tokenizer's control strings and the chat template changes "
                         "message contents, so they cannot be kept as plain text")
    ids = []
    for n, p in enumerate(parts):
        if n % 2:
            ids += tokenizer(contents[int(p)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif p:
            ids += tokenizer(p, add_special_tokens=False)["input_ids"]
    return ids


def model_context(model_dir):
    """The longest sequence the model takes (max_position_embeddings), or None if it does not say."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: could not read the model config ({str(e).strip().splitlines()[0]})") from e
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def checked_prompt_ids(records, tokenizer, path, limit=None, why="", prompt_format="auto"):
    """Every record's prompt ids; a prompt the chat template refuses, or one longer than `limit`
    tokens, stops the stage with its file and line, before any work."""
    from jinja2 import TemplateError

    def line(n):  # a dataset (not a JSONL file) has rows
        return record_line(path, n) if Path(path).is_file() else f"row {n}"
    out = []
    for n, rec in enumerate(records):
        try:
            ids = prompt_token_ids(tokenizer, rec["prompt"], prompt_format)
        except (InputError, TemplateError, ValueError) as e:
            _fail(path, line(n), "prompt", f"the chat template refused it: {e}")
        if limit is not None and len(ids) > limit:
            _fail(path, line(n), "prompt", f"{len(ids)} tokens, longer than {limit} {why}")
        out.append(ids)
    return out


def prompt_text(prompt) -> str:
    """The plain text a judge sees: the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


RESPONSE_MARK = "SPPO-RESPONSE-MARK"  # stands for an assistant message's content in a rendered template


def around_response(tokenizer, prompt):
    """(text before, text after) an assistant message that answers `prompt`, as the chat template
    renders the conversation: everything the template writes around the response's content."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": RESPONSE_MARK}], tokenize=False)
    before, found, after = text.partition(RESPONSE_MARK)
    if not found:
        raise InputError("the chat template does not write the assistant's message")
    return before, after


def templated_prompt_text(tokenizer, prompt) -> str:
    """The prompt as the official pipeline shows it to PairRM (uclaml/SPPO scripts/rank.py): the
    chat template's text up to where the assistant's answer starts, special-token text included
    ("<s>[INST] ... [/INST]"). The official code finds that point by rendering the answer "None"
    and cutting at the first "None", which also cuts a prompt that contains "None"; here the cut
    is at the answer itself, so the text is the same for every prompt without "None"."""
    return around_response(tokenizer, prompt)[0]


def response_end_ids(tokenizer, prompt_format="auto") -> list:
    """The tokens that end an assistant's turn: what the chat template writes right after an
    assistant message, up to and including its first special token (Llama-3 <|eot_id|>, Gemma
    <end_of_turn>, Mistral </s>; a newline after it belongs to the next turn). The tokenizer's EOS
    for plain prompts (no chat template, or prompt_format "plain"), or if the template writes no
    special token there."""
    if prompt_format == "plain":
        return [tokenizer.eos_token_id]
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    cached = _END_IDS.get(tokenizer)
    if cached is not None and cached[0] == key:  # rendering the template costs ~4 tokenizer calls
        return list(cached[1])
    ids = [tokenizer.eos_token_id]
    if tokenizer.chat_template is not None:
        after = tokenizer(around_response(tokenizer, "x")[1], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        end = next((n for n, i in enumerate(after) if i in special), None)
        ids = ids if end is None else after[:end + 1]
    _END_IDS[tokenizer] = (key, ids)
    return list(ids)


_END_IDS = weakref.WeakKeyDictionary()  # tokenizer -> ((chat template, eos), response_end_ids)


def response_token_ids(tokenizer, response: str, truncated: bool, prompt_format="auto") -> list:
    """A response's ids as trained on: its text (control strings in it stay text), plus the
    end-of-turn tokens (response_end_ids) when generation ended by itself."""
    ids = tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids if truncated else ids + response_end_ids(tokenizer, prompt_format)


def collate(pairs, pad_id, padding_side="split"):
    """Pad (prompt_ids, response_ids) pairs into one batch.

    padding_side: "right" or "left" pads whole sequences; "split" (default) left-pads the prompts
    and right-pads the responses, so every response starts in the same column and the LM head
    need not run on any prompt position (sequence_logps). Returns input_ids, attention_mask,
    response_mask (1 on response tokens) and position_ids that count real tokens only, so every
    layout gives the same logits.
    """
    import torch
    if padding_side == "split":
        width = max(len(p) for p, _ in pairs)
        pairs = [([pad_id] * (width - len(p)) + list(p), r, width - len(p)) for p, r in pairs]
    else:
        pairs = [(p, r, 0) for p, r in pairs]
    seqs = [list(p) + list(r) for p, r, _ in pairs]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, ((p, r, lead), s) in enumerate(zip(pairs, seqs)):
        start = length - len(s) if padding_side == "left" else 0
        input_ids[i, start:start + len(s)] = torch.tensor(s)
        attention_mask[i, start + lead:start + len(s)] = 1
        response_mask[i, start + len(p):start + len(s)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask, "position_ids": position_ids}


# From this vocabulary size up, the CPU training path scores targets in the head (head_scores_targets):
# below it the head is cheap and F.linear + cross_entropy are kept (the toy world's runs stay bit for bit).
HEAD_SCORING_MIN_VOCAB = 32768


def weight_times_hidden(weight, hidden):
    """An LM head's logits in the layout (W h^T): weight [V, d], hidden [n, d] -> [V, n].

    The same dot products as F.linear's h W^T, laid out so that MKL's sgemm on this CPU runs them
    1.4-3x faster when n is small and V large (Gemma-3: V = 262,144; NOTES.md, "Where the time
    goes on a 262,144-token vocabulary"). Used on the CPU only; GPUs keep F.linear.
    """
    return weight @ hidden.reshape(-1, hidden.shape[-1]).T


@contextlib.contextmanager
def head_scores_targets(head, mask, targets):
    """While the model runs, its LM head returns log pi(target) at the masked positions, not logits.

    The head gets hidden states [N, keep, d] (keep = logits_to_keep); its output becomes
    log_softmax(W h)[target] for the positions where mask [N, keep - 1] is set -> [n] (fp32). Inside
    the model's forward, so FSDP's hooks around it still hold the weight gathered. yields a dict whose
    "logps" is that tensor, to check that the model returned it unchanged (no scaling or capping).
    """
    scored = {}

    def forward(hidden):
        if hidden.shape[1] != mask.shape[1] + 1:  # the model ignored logits_to_keep: plain logits
            return type(head).forward(head, hidden)
        h = hidden[:, :-1][mask]  # [n, d]: the positions that predict a counted token
        logits = weight_times_hidden(head.weight, h).float()  # [V, n]
        scored["logps"] = logits.gather(0, targets[None])[0] - logits.logsumexp(0)
        return scored["logps"]

    head.forward = forward
    try:
        yield scored
    finally:
        del head.forward  # back to the module's own forward


def sequence_logps(model, batch):
    """Summed log pi(response | prompt) per sequence: batch from `collate` -> [N] (fp32).

    Token t is scored from position t-1; a target counts only if it is a response token and
    the position predicting it is real (never a pad), whatever the padding side. The LM head
    runs only from the first position that predicts a response token (`logits_to_keep`), and
    log-softmax only at the positions that count. On the CPU with a large vocabulary the head itself
    scores the targets in the (W h^T) layout (`head_scores_targets`); else logits and a fused
    cross_entropy.
    """
    import torch
    import torch.nn.functional as F
    predicts = (batch["response_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()  # [N, L-1]: t predicts t+1
    first = int(predicts.any(0).int().argmax())  # 0 if no response token at all: then nothing counts
    keep = predicts.shape[1] - first + 1  # positions first .. L-1; the last one predicts nothing
    mask = predicts[:, first:]  # [N, keep - 1]
    targets = batch["input_ids"][:, first + 1:][mask]  # [n]
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def forward():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False, **kwargs).logits

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    token_logps = None
    if (kwargs and isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.device.type == "cpu"
            and head.out_features >= HEAD_SCORING_MIN_VOCAB and getattr(model.config, "final_logit_softcapping", None) is None):
        with head_scores_targets(head, mask, targets) as scored:
            out = forward()
        if out is scored.get("logps"):  # else the model changed the head's output: score its logits below
            token_logps = out
    if token_logps is None:
        logits = forward()[:, -keep:-1]
        token_logps = -F.cross_entropy(logits[mask].float(), targets, reduction="none")
    rows = mask.nonzero(as_tuple=True)[0]
    return torch.zeros(len(mask), dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)


# ---- processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is rank 0 of 1 -----


def dist_env():
    """(rank, world size, local rank) of this process, from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def shard_of(records, rank, world):
    """Contiguous slice `rank` of `world` near-equal slices: each record in exactly one, order kept.

    Any number of records over any world size: sizes differ by at most one; a slice may be empty.
    """
    bounds = [len(records) * r // world for r in range(world + 1)]
    return records[bounds[rank]:bounds[rank + 1]]


def shard_path(out, records, rank, world, config) -> Path:
    """Where rank `rank` writes its shard of `out`: named by a hash of the stage's config and of
    the shard's records (their whole content, not only ids), so a re-run with other flags or an
    edited input never reuses a stale shard."""
    shard = shard_of(records, rank, world)
    key = hashlib.sha256(json.dumps([config, shard], sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = Path(out)
    return out.with_name(out.name + ".shards") / f"{key}-{rank:05d}-of-{world:05d}.jsonl"


def run_sharded(records, out, work, config):
    """Run `work(shard) -> new records` on this rank's shard of `records`; write `out` in input order.

    Under torchrun every rank does its own slice and writes it to its own shard file (atomically);
    a rank whose shard file exists skips its work, so a re-run after a crash redoes only the
    unfinished shards. After a barrier rank 0 merges the shards into `out` and removes them.
    The shard files must be on a filesystem all ranks see (several nodes: a shared one).
    One process: no shard files, `work(records)` goes straight to `out`.
    """
    rank, world, _ = dist_env()
    if world == 1:
        write_records(out, work(records))
        return
    import datetime
    import shutil
    import torch.distributed as dist
    # gloo for a barrier of CPU tensors, also on GPUs; a long timeout because ranks wait here
    # for the slowest shard (hours of generation on a big model)
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    mine = shard_path(out, records, rank, world, config)
    if not mine.exists():
        done = work(shard_of(records, rank, world))
        atomic_write(mine, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    dist.barrier()
    if rank == 0:
        merged = []
        for r in range(world):
            path = shard_path(out, records, r, world, config)
            shard = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if [s["id"] for s in shard] != [s["id"] for s in shard_of(records, r, world)]:
                raise InputError(f"{path}: shard does not hold the ids of slice {r} of {world}")
            merged += shard
        write_records(out, merged)
        shutil.rmtree(mine.parent)
    dist.destroy_process_group()
