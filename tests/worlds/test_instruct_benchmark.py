"""The instruct world's scoring is a function of the text: language detection seeded, NLTK's data
checked before the checkers read it, no task built that no response can satisfy, IFBench's
prompts all scored or bounded. No model is loaded here."""
import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

from worlds import instruct

ROOT = Path(__file__).resolve().parents[2]


def fresh_python(code, cache, n=1):
    """Run `code` in n fresh interpreters at once (SPPO_CACHE=cache); their outputs, stripped."""
    env = dict(os.environ, SPPO_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), out
    return [o.strip() for o, _ in out], [e for _, e in out]


def test_lowercase_verdict_is_the_same_in_every_process(tmp_path):
    # langdetect, unseeded, calls "good morning" English about half the time (a random state drawn
    # afresh per detection), so the lowercase checker's verdict on it would be a coin toss: 20
    # verdicts in each of two fresh processes must agree.
    code = ("from worlds import instruct; reg = instruct.registry()\n"
            "print([instruct.follow_list('good morning', ['change_case:english_lowercase'], [{}], 'p', reg=reg)[0]\n"
            "       for _ in range(20)])")
    instruct.nltk_data_dir(tmp_path)  # written once, before the processes start
    verdicts, _ = fresh_python(code, tmp_path, n=2)
    assert len({v for out in verdicts for v in eval(out)}) == 1, verdicts


def test_a_cut_punkt_file_is_written_again_before_the_checkers_read_it(tmp_path):
    # "Dr." is a known abbreviation only through abbrev_types.txt: without it, three sentences
    code = ("from worlds import instruct; reg = instruct.registry()\n"
            "inst = reg.INSTRUCTION_DICT['length_constraints:number_sentences']('x')\n"
            "inst.build_description(num_sentences=3, relation='less than')\n"
            "print(inst.check_following('Dr. Smith came. He left.'))")
    (first,), _ = fresh_python(code, tmp_path)
    abbrev = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt"
    good = abbrev.read_bytes()
    abbrev.write_bytes(good[:len(good) // 3])
    (again,), (err,) = fresh_python(code, tmp_path)
    assert first == again == "True"
    assert "abbrev_types.txt" in err and "written again" in err
    assert abbrev.read_bytes() == good


# ---- no task is built that no response can follow -------------------------------------------------------------

FILLER = ["the sun is warm and the sky is blue", "we like to walk by the river in the evening",
          "birds sing in the morning light", "the old tree stands in the quiet field", "you should rest now",
          "my dog sleeps by the door", "the hills look green", "he writes to me on sundays"]
PHRASES = ["the cat", "the sun"]  # short, and English to langdetect even when repeated
WORDS = ["sun", "sky", "tree", "blue", "dog", "wind", "hill", "road", "lemon", "river", "bird", "snow"]


def witness(types, kwargs, reg):
    """A response that follows every instruction by IFEval's own checkers, searched over a few ways of
    writing one (cases, one sentence or several, short or padded), or None if none does."""
    args = dict(zip(types, kwargs))
    keyword = args.get("keywords:frequency")
    avoid = keyword["keyword"].lower() if keyword and keyword["relation"] == "less than" else None
    words, phrases, filler = ([w for w in pool if not avoid or avoid not in w] for pool in (WORDS, PHRASES, FILLER))
    if not words or not filler:
        return None
    units = [words[0]] + phrases[:1] + filler[:1]  # a word, a short phrase, a sentence
    has = lambda *ts: any(t in args for t in ts)  # the ways of writing worth trying: only where they can matter
    capital = args.get("change_case:capital_word_frequency", {}).get("capital_relation")
    for lower, one_sentence, unit, pad, bare_ps, caps_end in itertools.product(
            ("all",) if has("change_case:english_lowercase") else ("none", "tail") if capital == "less than" else ("none",),
            (True, False) if has("length_constraints:number_sentences") else (True,),
            units[::-1] if has("change_case:english_lowercase") else units[:1],
            (0, 60) if has("change_case:english_lowercase", "length_constraints:number_words") else (0,),
            (False, True) if has("detectable_content:postscript") else (False,),
            (False, True) if capital == "at least" and has("startend:end_checker") else (False,)):
        y = compose(args, words, filler, lower, one_sentence, unit, pad, bare_ps, caps_end)
        if all(follows(y, t, tuple(sorted(kw.items())), reg) for t, kw in zip(types, kwargs)):
            return y
    return None


@functools.lru_cache(maxsize=None)
def follows(response, type_id, kwargs, reg):
    """IFEval's strict verdict on one instruction (follow_list checks each alone), kept: the search
    writes the same response for many combinations, and the checkers (a seeded language detector,
    NLTK's tokenizers) give the same verdict on the same text."""
    return instruct.follow_list(response, [type_id], [dict(kwargs)], "p", reg=reg)[0]


def compose(args, words, filler, lower, one_sentence, unit, pad, bare_ps, caps_end):
    """One response from parts: each instruction's required pieces; the filler `unit` (a word, a
    short phrase or a sentence; a lone word is left out where a piece can stand alone), `pad` more
    words of filler; the postscript (bare: its marker alone) and the end phrase (caps_end: in
    capitals, counted as capital words) last; lower: "all" the text or the "tail" in lowercase."""
    end = "" if one_sentence else "."
    short = unit == words[0]
    head = [unit]
    sections = args.get("detectable_format:multiple_sections")
    end_phrase = args.get("startend:end_checker", {}).get("end_phrase", "")
    end_phrase = end_phrase.upper() if caps_end else end_phrase
    capitals_given = (sections["num_sections"] if sections and sections["section_spliter"].isupper() else 0) \
        + (len(end_phrase.split()) if caps_end else 0)
    sentences = args.get("length_constraints:number_sentences")
    if sentences and sentences["relation"] == "at least" and not one_sentence:
        head = [unit] * sentences["num_sentences"]
    keyword = args.get("keywords:frequency")
    if keyword and keyword["relation"] == "at least":
        head.append(" ".join([keyword["keyword"]] * keyword["frequency"]))
    capital = args.get("change_case:capital_word_frequency")
    if capital and capital["capital_relation"] == "at least":
        head.append(" ".join(w.upper() for w in (words * 10)[:max(0, capital["capital_frequency"] - capitals_given)]))
    if "detectable_format:number_highlighted_sections" in args:
        highlights = args["detectable_format:number_highlighted_sections"]["num_highlights"]
        head.append(" ".join([words[0]] + [f"*{w}*" for w in words[:highlights]]))  # not at a line's start: a bullet
    if "detectable_content:number_placeholders" in args:
        head.append(" ".join(f"[{w}]" for w in words[:args["detectable_content:number_placeholders"]["num_placeholders"]]))
    head += [" ".join(filler)] * (pad // 10)
    head = [h for h in head if h]
    if short and not (sentences and sentences["relation"] == "at least"):
        head = head[1:]  # the pieces stand alone (a word is put back below if nothing else is written)
    blocks = [(" " if one_sentence else ". ").join(head) + end] if head else []
    if "detectable_format:number_bullet_lists" in args:
        blocks.append("\n".join(f"* {w}" for w in (words * 4)[:args["detectable_format:number_bullet_lists"]["num_bullets"]]))
    if sections:
        blocks += [f"{sections['section_spliter']} {i}{'' if short else ' ' + words[0]}{end}"
                   for i in range(1, sections["num_sections"] + 1)]
    paragraphs = args.get("length_constraints:number_paragraphs")
    if paragraphs:
        n = paragraphs["num_paragraphs"]
        blocks += [unit + end] * max(0, n - len(blocks))
        blocks = ["\n".join(blocks[:len(blocks) - n + 1])] + blocks[len(blocks) - n + 1:]
    tail = []
    if "detectable_content:postscript" in args:
        tail.append(args["detectable_content:postscript"]["postscript_marker"] + ("" if bare_ps else " " + words[0]))
    if end_phrase:
        tail.append(end_phrase)
    if tail:
        tail = " ".join(tail)
        blocks = blocks[:-1] + ["\n".join(blocks[-1:] + [tail.lower() if lower == "tail" else tail])]
    if not blocks:
        return unit
    text = ("\n***\n" if paragraphs else "\n").join(blocks)
    return text.lower() if lower == "all" else text


def argument_values(type_id, reg):
    """Every argument dict the world's builder can give type_id (instruct.feasible_args' ranges, the
    registry's own choices where it draws), except: a word count only at its range's ends, a capital
    word count at its upper end and where it meets the section counts, and a keyword only as one of
    the words that occur in a text another instruction forces, or one that does not. A check's
    verdict is monotone in its threshold (a response with fewer than 15 words has fewer than 60), and
    a keyword matters only where a text is forced."""
    from if_verifiable.ifeval import instructions, instructions_util
    rel = ("less than", "at least")
    forced = [s.lower() for s in ("SECTION", "PART", *instructions._ENDING_OPTIONS, *instructions._POSTSCRIPT_MARKER)]
    keywords = [w for w in instructions_util.WORD_LIST if any(w in f for f in forced)] + ["western"]
    return {"length_constraints:number_words": [{"num_words": n, "relation": r} for n in (15, 60) for r in rel],
            "length_constraints:number_sentences": [{"num_sentences": n, "relation": r} for n in range(1, 5) for r in rel],
            "length_constraints:number_paragraphs": [{"num_paragraphs": n} for n in (2, 3)],
            "detectable_format:multiple_sections": [{"num_sections": n, "section_spliter": s}
                                                    for n in (2, 3) for s in ("SECTION", "PART")],
            "detectable_format:number_bullet_lists": [{"num_bullets": n} for n in (2, 3, 4)],
            "detectable_format:number_highlighted_sections": [{"num_highlights": n} for n in (1, 2)],
            "detectable_content:number_placeholders": [{"num_placeholders": n} for n in (1, 2)],
            "detectable_content:postscript": [{"postscript_marker": m} for m in instructions._POSTSCRIPT_MARKER],
            "startend:end_checker": [{"end_phrase": e} for e in instructions._ENDING_OPTIONS],
            "change_case:english_lowercase": [{}],
            "change_case:capital_word_frequency": [{"capital_frequency": n, "capital_relation": r}
                                                   for n in (1, 2, 3, 4, 10) for r in rel],
            "keywords:frequency": [{"keyword": k, "frequency": n, "relation": r}
                                   for k in keywords for n in (1, 2, 3) for r in rel]}[type_id]


def test_the_argument_ranges_are_the_builders():
    # argument_values copies the ranges: each built instruction's arguments must be among them
    reg = instruct.registry()
    train, held = instruct.make_prompts(seed=0)
    for r in train + held:
        for t, kw in zip(r["instruction_id_list"], r["kwargs"]):
            if t == "keywords:frequency":
                kw = dict(kw, keyword="western") if kw["keyword"] not in {a["keyword"] for a in argument_values(t, reg)} else kw
            if t == "length_constraints:number_words":
                assert 15 <= kw["num_words"] <= 60
                kw = dict(kw, num_words=15 if kw["relation"] == "less than" else 60)
            if t == "change_case:capital_word_frequency":
                assert 1 <= kw["capital_frequency"] <= 10
                kw = dict(kw, capital_frequency=min(kw["capital_frequency"], 4) if kw["capital_relation"] == "less than"
                          else 10 if kw["capital_frequency"] > 4 else kw["capital_frequency"])
            assert kw in argument_values(t, reg), (t, kw)


def test_every_combination_the_builders_can_draw_is_followable_exactly_when_it_is_built():
    # For every set of 1-3 types the registry allows together and every argument the builders can
    # draw (argument_values), the world builds it exactly when the search finds a response that
    # IFEval's checkers pass. A set holding a pair the world refuses is refused whatever is added
    # (more instructions never make a response easier), so only the pair itself is searched.
    reg = instruct.registry()
    registry_ok = lambda ts: all(b not in reg.INSTRUCTION_CONFLICTS[a] for a in ts for b in ts if a != b)
    mismatches, built, refused = [], 0, 0
    for n in (1, 2, 3):
        for types in itertools.combinations(instruct.TYPES, n):
            if not registry_ok(types):
                continue
            compatible = instruct.compatible(types)  # of the types alone
            if n == 3 and any(pair <= set(types) for pair in instruct.WORLD_CONFLICTS):
                assert not compatible
                continue
            for kwargs in itertools.product(*(argument_values(t, reg) for t in types)):
                builds = compatible and instruct.unsatisfiable(types, list(kwargs)) is None
                followable = witness(types, list(kwargs), reg) is not None
                built += builds
                refused += not builds
                if builds != followable:
                    mismatches.append((types, kwargs, "built" if builds else "refused", followable))
    assert not mismatches, (len(mismatches), mismatches[:5])
    assert built > 0 and refused > 0


# ---- IFBench on all its prompts ------------------------------------------------------------------------------


def test_ifbench_bounds_are_the_scores_with_the_missing_data_all_passing_or_all_failing(monkeypatch):
    # The package's own sample outputs. The checks that need NLTK's stopwords and POS tagger are run
    # a second way: IFBench's whole-prompt test with those two functions replaced by ones that make
    # every such check pass (the high bound) or fail (the low bound).
    import json
    from importlib import metadata
    import nltk
    lib = instruct.ifbench_module()
    rows = instruct.ifbench_prompts()
    path = Path(metadata.distribution(instruct.IFBENCH_DIST).locate_file("ifbench/data/sample_output.jsonl"))
    responses = {r["prompt"]: r["response"] for r in map(json.loads, path.read_text().splitlines())}
    empty = next(r for r in rows if {"words:start_verb", "ratio:stop_words"} & set(r["instruction_id_list"]))
    responses[empty["prompt"]] = ""  # an empty response fails; it is not unscored
    monkeypatch.setattr(nltk, "download", lambda *a, **k: False)
    bounds = instruct.ifbench_bounds(lib, rows, responses)
    assert bounds["prompts"] == 294 and 0 < bounds["subset_prompts"] < 294 and bounds["unscored_instructions"] > 0
    assert instruct.ifbench_verdicts(lib, empty, responses, "strict") == [False] * len(empty["instruction_id_list"])

    util = lib.instructions_registry.instructions.instructions_util
    for side, stopwords, tag in (("high", 0, "VB"), ("low", 10 ** 9, "NN")):
        monkeypatch.setattr(util, "count_stopwords", lambda text, n=stopwords: n)
        monkeypatch.setattr(nltk, "pos_tag", lambda tokens, t=tag: [(w, t) for w in tokens])
        for mode, test in (("strict", lib.test_instruction_following_strict),
                           ("loose", lib.test_instruction_following_loose)):
            outs = [test(lib.InputExample(key=r["key"], instruction_id_list=r["instruction_id_list"], prompt=r["prompt"],
                                          kwargs=[{a: v for a, v in k.items() if v is not None} for k in r["kwargs"]]),
                         responses) for r in rows]
            assert bounds[f"prompt_{mode}_{side}"] == sum(o.follow_all_instructions for o in outs) / 294
            flat = [v for o in outs for v in o.follow_instruction_list]
            assert bounds[f"inst_{mode}_{side}"] == sum(flat) / len(flat)
    # a prompt passes for certain only when all its verdicts are known
    assert abs(bounds["prompt_strict_low"] - bounds["prompt_strict_subset"] * bounds["subset_prompts"] / 294) < 1e-12


# ---- pi_0's evaluation made once per world and backend -------------------------------------------------------


def test_pi0_evaluation_is_made_once_and_equals_a_run_of_its_own(toy_world, tmp_path, monkeypatch):
    # the toy world's model stands in for SmolLM2 (any chat model samples the instruct prompts)
    import json
    from generate import sampler
    monkeypatch.setenv("SPPO_CACHE", str(tmp_path / "cache"))
    train, held = instruct.make_prompts(seed=0)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (held[0], held[2])))  # seen, unseen
    world = {"eval_prompts": tmp_path / "eval.jsonl", "model": toy_world["model"]}
    calls = []

    def counting(model_dir, records, K, **kw):
        calls.append(model_dir)
        return sampler()(model_dir, records, K, **kw)

    shared = instruct.shared_eval_dir(world, "hf", "auto")
    assert shared != instruct.shared_eval_dir(world, "vllm", "auto")
    model = str(toy_world["model"])
    settings = dict(samples=2, max_new_tokens=8, sample=counting)
    first = instruct.evaluate([model], world, tmp_path / "a", shared=shared, **settings)
    second = instruct.evaluate([model, model], world, tmp_path / "b", shared=shared, **settings)
    assert len(calls) == 2  # pi_0 once for both runs, and run b's pi_1
    alone = instruct.evaluate([model], world, tmp_path / "c", **settings)  # no shared directory: made in the run
    for run in ("a", "b"):
        assert (tmp_path / run / "iter0" / "eval_samples.json").read_bytes() == \
            (tmp_path / "c" / "iter0" / "eval_samples.json").read_bytes()
    strip = lambda row: json.dumps({k: v for k, v in row.items() if k != "samples"}, sort_keys=True)  # NaN as text
    assert strip(first[0]) == strip(second[0]) == strip(alone[0])


def test_skipped_iterations_are_not_sampled_and_the_others_are_as_in_a_full_evaluation(toy_world, tmp_path):
    # iterate.py --no-eval_every_iteration: the intermediate policies are passed in skip
    import json
    train, held = instruct.make_prompts(seed=0)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (held[0], held[2])))
    world = {"eval_prompts": tmp_path / "eval.jsonl", "model": toy_world["model"]}
    model = str(toy_world["model"])  # pi_0, and a stand-in for pi_1 and pi_2: the rows are checked by iteration
    settings = dict(samples=2, max_new_tokens=8)
    ends = instruct.evaluate([model, model, model], world, tmp_path / "ends", skip={1}, **settings)
    full = instruct.evaluate([model, model, model], world, tmp_path / "full", **settings)
    assert [r["iteration"] for r in ends] == [0, 2] and [r["iteration"] for r in full] == [0, 1, 2]
    assert not (tmp_path / "ends" / "iter1").exists()
    strip = lambda row: json.dumps({k: v for k, v in row.items() if k != "samples"}, sort_keys=True)
    assert [strip(r) for r in ends] == [strip(full[0]), strip(full[2])]


def test_ifbench_leaves_no_stand_in_spacy_behind():
    # `datasets` takes any module named spacy in sys.modules for the real one (spacy.Language) when it
    # pickles: a stand-in left there broke every later datasets call in the same process
    import sys
    instruct.ifbench_module()
    assert "spacy" not in sys.modules or hasattr(sys.modules["spacy"], "Language")
