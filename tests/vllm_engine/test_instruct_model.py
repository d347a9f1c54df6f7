"""The vLLM backend on the real chat model of the instruct world (SmolLM2-135M-Instruct: ChatML template,
<|im_end|> ends a turn), on the world's own held-out prompts and the paper's decoding (T 0.7, top_p 0.9).

A file of its own, started before test_vllm_engine.py's toy engine: one engine at a time."""
import json
from pathlib import Path

import pytest

from machinery.lm import load_tokenizer, prompt_token_ids, response_end_ids, response_token_ids
from machinery.vllm_backend import close_engine, engine_kwargs, generate_responses_vllm, prepare_vllm_process, start_engine
from worlds import instruct

DECODING = dict(temperature=0.7, top_p=0.9, seed=4)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    world = instruct.build_world(tmp_path_factory.mktemp("instruct"), seed=0)
    records = [json.loads(line) for line in Path(world["eval_prompts"]).read_text().splitlines()]
    return Path(world["model"]), records


@pytest.fixture(scope="module")
def engine(chat_model):
    prepare_vllm_process(0, 1, 1)
    yield start_engine(**engine_kwargs(chat_model[0], 512, kv_cache_gib=0.5, enforce_eager=True))
    close_engine()


def test_a_full_file_at_the_papers_decoding_samples_as_each_prompt_alone(engine, chat_model):
    # the world's 48 held-out prompts x K=4: more prompt tokens than one engine step takes, which
    # crashed vLLM on a CPU when a seeded prompt was split over two steps
    model, records = chat_model
    tok = load_tokenizer(model)
    assert sum(len(prompt_token_ids(tok, r["prompt"])) for r in records) * 4 > 4096
    full = generate_responses_vllm(engine, model, tok, records, 4, max_new_tokens=12, **DECODING)
    alone = [generate_responses_vllm(engine, model, tok, [r], 4, max_new_tokens=12, **DECODING)[0] for r in records[-3:]]
    assert [r["id"] for r in full] == [r["id"] for r in records]
    assert [(r["responses"], r["truncated"]) for r in full[-3:]] == [(r["responses"], r["truncated"]) for r in alone]


def test_the_end_of_turn_token_ends_a_response_and_is_trained_on(engine, chat_model):
    model, records = chat_model
    tok = load_tokenizer(model)
    end = response_end_ids(tok)
    assert tok.convert_ids_to_tokens(end[-1:]) == ["<|im_end|>"]
    short = [dict(r, id=f"{r['id']}-short", prompt=[{"role": "user", "content": "Say hello in one word."}]) for r in records[:6]]
    out = generate_responses_vllm(engine, model, tok, short, 2, max_new_tokens=32, **DECODING)
    finished = [(r, k) for r in out for k in range(2) if not r["truncated"][k]]
    assert len(finished) >= 6  # a one-word answer ends well within 32 tokens
    for r, k in finished:
        text = r["responses"][k]
        assert "<|im_end|>" not in text and "<|im_start|>" not in text
        ids = response_token_ids(tok, text, False)
        assert ids[-len(end):] == end  # training appends the end of turn the model stopped at
    # cut short: truncated, and nothing of the end of turn in the text
    cut = generate_responses_vllm(engine, model, tok, short[:2], 2, max_new_tokens=1, **DECODING)
    assert all(r["truncated"] == [True, True] for r in cut)
