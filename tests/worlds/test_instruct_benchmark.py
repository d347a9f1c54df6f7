"""The instruct world's scoring is a function of the text: language detection seeded, NLTK's data
checked before the checkers read it, no task built that no response can satisfy, IFBench's
prompts all scored or bounded. No model is loaded here."""
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
