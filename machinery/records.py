"""The data side: stage files and their checks, prompt sources, files written atomically.

Stage files are JSONL, one record per prompt: prompts {id, prompt}; generate.py adds responses and
truncated; rank.py adds P and win_rate (and scores). `read_records` checks a file of any stage and
stops at the first bad record with file, line and field (`InputError`; the stages exit 2 with it).
Outputs are written to a temporary file and renamed (`atomic_write`), so nothing is half-written.
Nothing here imports torch.
"""
import contextlib
import errno
import fcntl
import hashlib
import glob
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from machinery.lifetime import end_on_interrupt, stop_children


class InputError(ValueError):
    """Bad input; the message names file, line and field. Stages exit non-zero with it."""


def fail_with(e: Exception):
    """Exit non-zero with one clear line: what scripts do with an InputError. With SPPO_TRACEBACK=1
    the traceback behind the line comes first (for an error raised from another, such as a
    plug-in judge's exception, that one's too): the one line is for users, the trace for whoever
    debugs the code that raised."""
    if os.environ.get("SPPO_TRACEBACK") == "1" and isinstance(e, BaseException):
        import traceback
        traceback.print_exception(e, file=sys.stderr)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)


def one_line_errors(main):
    """Run a script's main(): bad input, a full or read-only disk, Ctrl-C each end in one line, not a
    traceback (exit 2; Ctrl-C 130). Outputs are written atomically, so nothing is half-written.
    Ctrl-C also stops every process the script started (lifetime.py), wherever it lands."""
    end_on_interrupt()
    try:
        main()
    except InputError as e:
        fail_with(e)
    except KeyboardInterrupt:
        stop_children()
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        fail_with(f"{e.filename or ''}: {e.strerror}: nothing half-written is left; "
                  + ("free space and " if e.errno in DISK_ERRORS[:3] else "") + "run the same command again")


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


def _check_unicode(rec, path, line_no):
    """Python's json reads a lone surrogate escape ("\\ud800"), which no UTF-8 file or tokenizer takes."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        for field, value in rec.items():
            try:
                json.dumps([field, value], ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                _fail(path, line_no, field, f"lone surrogate {e.object[e.start:e.end]!r}: not valid Unicode")
        _fail(path, line_no, None, "a lone surrogate: not valid Unicode")


def _check_record(rec, path, line_no, stage, K):
    """Check one record for `stage` in ("prompts", "responses", "ranked"); returns its K."""
    if not isinstance(rec, dict):
        _fail(path, line_no, None, f"expected a JSON object, got {type(rec).__name__}")
    _check_unicode(rec, path, line_no)
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
    scores = rec.get("scores")
    if scores is not None and not (isinstance(scores, list) and len(scores) == K and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        _fail(path, line_no, "scores", f"expected a list of K={K} numbers")
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


def write_records(path, records):
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def load_prompts(source, split="train", column="prompt"):
    """Prompt records {id, prompt, ...} from a JSONL file, a JSON list (`read_json_prompts`: AlpacaEval's
    eval set), a directory saved by `datasets` (`save_to_disk`), or a hub dataset name (the only case
    that touches the network).

    Dataset rows keep all their columns; the prompt is taken from `column` (a string or a list
    of chat messages) and the id from "id" or "prompt_id" when present, else "<source>-<row>".
    """
    path = Path(source)
    if not path.exists() and looks_like_path(source):
        raise InputError(f"{source}: file not found")
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
    raw = Path(path).read_bytes()
    try:
        rows = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        _fail(path, None, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})")
    except json.JSONDecodeError as e:
        _fail(path, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        _fail(path, None, None, "malformed JSON (nested too deeply)")
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


# ---- files written whole or not at all ---------------------------------------------------------


def atomic_write(path, write_fn, mode="w"):
    """Write through `write_fn(file)` to a temporary file, then rename: never half-written.

    Temporaries of `path` left by writers that were killed (their pid is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with named_os_errors(path), open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def named_os_errors(path):
    """An OSError raised in the block without a file name (a full disk found by write() or fsync,
    or inside a library's save) gets `path`, the output being written: the one-line error names it."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


@contextlib.contextmanager
def held_lock_file(path):
    """Hold an exclusive lock on the file `path` for the block, waiting while another process holds
    it; the file is removed when the block ends, so none is left beside the user's files. A waiter
    that wakes on a file its holder has removed tries again on the file now at `path`: the process
    that holds the lock on that file is the only holder."""
    while True:
        lock = open(path, "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        yield
    finally:
        Path(path).unlink(missing_ok=True)
        lock.close()


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


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
    A lock file beside it (removed when the build ends) makes a second builder wait for the first,
    then find out_dir built; the kernel drops the lock of a killed builder, and the next one deletes
    its half-built directory.
    An out_dir that holds files but no BUILT is refused, not replaced; so is a built one whose files
    are no longer those it was built with (BUILT lists their sizes and sha256: check_built).
    """
    out_dir = Path(out_dir)
    if (out_dir / BUILT).exists():
        check_built(out_dir)
        yield None
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with held_lock_file(out_dir.with_name(f".{out_dir.name}.lock")):  # waits while another process builds
        if (out_dir / BUILT).exists():  # it did
            check_built(out_dir)
            yield None
            return
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a directory")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise InputError(f"{out_dir}: exists and holds no finished build (no {BUILT!r} file); "
                             "delete it or give another directory")
        for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp*"):  # a killed builder's
            shutil.rmtree(stale)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
        try:
            with named_os_errors(out_dir):
                tmp.mkdir()
                yield tmp
                manifest = {p.relative_to(tmp).as_posix(): [p.stat().st_size, file_sha256(p)]
                            for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / BUILT).write_text(json.dumps(manifest, indent=0) + "\n")
                os.replace(tmp, out_dir)  # onto nothing, or onto the empty directory checked above
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_built(out_dir):
    """A directory build_once finished holds the files it was built with, unchanged (a file deleted,
    cut or edited since would be read as the world's: a traceback or a wrong result later); a
    damaged one is refused in one line. A build marked before BUILT listed its files is taken as it is."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / BUILT).read_text())
    except ValueError:
        return
    for name, (size, digest) in sorted(manifest.items()) if isinstance(manifest, dict) else ():
        path = out_dir / name
        how = "is missing" if not path.is_file() else f"is {path.stat().st_size} bytes, built as {size}" if \
            path.stat().st_size != size else "changed" if file_sha256(path) != digest else None
        if how:
            raise InputError(f"{out_dir}: {name} {how} since the directory was built (see its {BUILT!r} file): "
                             f"delete {out_dir} to build it again")


def cache_root() -> Path:
    """Where what is built once per machine lives (the converted real LM, the built-in worlds):
    $SPPO_CACHE, else ~/.cache/sppo (outside the repo)."""
    return Path(os.environ.get("SPPO_CACHE") or Path.home() / ".cache" / "sppo")


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


# ---- paths, checked before any work ------------------------------------------------------------


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
    elif looks_like_path(name):
        raise InputError(f"{flag} {name}: directory not found")


def looks_like_path(name) -> bool:
    """A name meant as a local file or directory, not a hub name ("org/name"): it starts with . / ~,
    has more than one /, or ends in a data file's suffix."""
    return (str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
            or Path(name).suffix in (".json", ".jsonl", ".parquet", ".csv", ".arrow"))


def path_stamp(name):
    """A cheap version stamp of a local file or directory: (file, size, mtime) of each of its files;
    anything else (a hub name) as it is; nothing ("" or None, not the current directory) as "".
    Keys of reusable work include it."""
    if not name:
        return ""
    path = Path(name)
    if not path.exists():
        return str(name)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]  # lists: as JSON reads them


def check_not_input(out, inputs, flag="--out"):
    """Refuse an output that is an input, lies inside an input directory, or holds an input (a
    directory output is replaced whole). inputs: {flag: path}; paths that do not exist locally (hub
    names, None) are skipped; symlinks are resolved."""
    out = Path(out).resolve()
    for name, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        path = Path(path).resolve()
        if out == path:
            what = f"is {name} {path}"
        elif path in out.parents:
            what = f"is inside {name} {path}"
        elif out in path.parents:
            what = f"holds {name} {path}"
        else:
            continue
        raise InputError(f"{flag} {out}: {what}; refusing to replace an input: give another {flag}")


WORK_MARK = ".sppo-work"  # in every work directory a stage creates: what it may empty or delete


def make_work_dir(path, owner):
    """Create the work directory `path` (or keep it) and mark it as made by `owner`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / WORK_MARK).exists():
        atomic_write(path / WORK_MARK, lambda f: f.write(f"{owner}\n"))
    return path


def check_work_dir(path, owner, flag="--out"):
    """A work directory that exists must be one a stage made (it holds WORK_MARK) or be empty (but
    for the marker's temporary: a stage killed between the mkdir and the marker): a user's directory
    of the same name is refused, never emptied."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory; move it away or give another {flag}")
    held = [p for p in path.iterdir() if not p.name.startswith(f".{WORK_MARK}.tmp")]
    if held and not (path / WORK_MARK).exists():
        raise InputError(f"{path}: exists and was not made by {owner} (no {WORK_MARK} in it); refusing to "
                         f"delete it: move it away or give another {flag}")


@contextlib.contextmanager
def exclusive_lock(path, busy):
    """Hold the lock file `path` for the block, or raise InputError(busy) if another process holds it.
    The kernel drops the lock when the file closes, however the process ends."""
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(busy) from None
        yield


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def content_stamp(name):
    """What an input holds: the sha256 of a local file, the path_stamp of a directory, else (a hub
    name) the name; nothing ("" or None) as "". A run directory records it, so a changed file is
    not mistaken for the old one."""
    if not name:
        return ""
    path = Path(name)
    return file_sha256(path) if path.is_file() else path_stamp(name)
