"""Chat models' turn formats: the end tokens a trained response gets and generation stops on, and
the prompt text PairRM reads in the official pipeline. Tokenizers built here mimic Llama-3,
Mistral and Gemma (special tokens and documented turn formats; templates written here); the real
Gemma-3 tokenizer is checked too when the real-LM package is installed."""
import copy

import pytest
import torch

import generate
import rank
from machinery.lm import (load_tokenizer, prompt_token_ids, response_end_ids, response_token_ids, stop_token_ids,
                          templated_prompt_text)
from machinery.records import write_records

CORPUS = ["which fruit suits the picnic", "pick a colour for the party", "the apple is sweet and the pear is soft",
          "a plum or a fig would be fine", "user assistant model system", "INST None of these"] * 20
# Llama-3: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>; the tokenizer's EOS is <|end_of_text|>
LLAMA3 = dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              bos="<|begin_of_text|>", eos="<|end_of_text|>", end="<|eot_id|>", template=(
                  "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"))
# Mistral-Instruct: <s>[INST] user [/INST]answer</s>; [INST] is plain text
MISTRAL = dict(specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", end="</s>", template=(
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"))
# Gemma: <start_of_turn>user\ncontent<end_of_turn>\n<start_of_turn>model\n; the tokenizer's EOS is <eos>
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA = dict(specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>",
             end="<end_of_turn>", template=GEMMA_TEMPLATE)
KINDS = {"llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA}


def build_tokenizer(kind, out_dir):
    """A byte-level BPE tokenizer with `kind`'s special tokens and chat template, saved and reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    spec = KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=spec["specials"], show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"])
    hf.chat_template = spec["template"]
    hf.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


@pytest.fixture(scope="module", params=sorted(KINDS))
def chat_tok(request, tmp_path_factory):
    return request.param, build_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def official_judge_text(tok, prompt):
    """What uclaml/SPPO scripts/rank.py builds for PairRM (its `apply_template`): the conversation
    with the answer "None", rendered as text, cut at the first "None"."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": "None"}],
                                   tokenize=False).split("None")[0]


def check_turn_format(tok, end_token):
    """The trained sequence is the template's own tokenisation of the conversation, up to and
    including the end-of-turn token; BOS once; generation stops on that token."""
    end = tok.convert_tokens_to_ids(end_token)
    assert response_end_ids(tok) == [end]
    for prompt, answer in [("Which fruit suits the picnic?", "A plum or a fig."), ("Pick a colour.", "the apple")]:
        seq = prompt_token_ids(tok, prompt) + response_token_ids(tok, answer, truncated=False)
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                       tokenize=True, return_dict=False)
        assert seq == list(full[:len(seq)]) and seq[-1] == end, (tok.decode(seq), tok.decode(full))
        assert seq.count(tok.bos_token_id) == 1 and seq[0] == tok.bos_token_id
        assert response_token_ids(tok, answer, truncated=True) == tok(answer, add_special_tokens=False)["input_ids"]
    assert end in stop_token_ids(tok.eos_token_id, tok)


def test_end_tokens_are_the_templates(chat_tok):
    kind, tok = chat_tok
    check_turn_format(tok, KINDS[kind]["end"])
    if kind != "mistral":  # there the turn ends with EOS itself; elsewhere EOS is not what ends a turn
        assert response_end_ids(tok) != [tok.eos_token_id]
    assert response_end_ids(tok, "plain") == [tok.eos_token_id]  # plain prompts (no template): EOS


def test_generation_stops_at_the_end_of_turn(chat_tok):
    """A tiny Llama whose LM head always picks the end-of-turn token: HF generation stops there
    (a response of no tokens, not truncated) although the model's own EOS is another token."""
    from transformers import LlamaConfig, LlamaForCausalLM
    kind, tok = chat_tok
    end = tok.convert_tokens_to_ids(KINDS[kind]["end"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.lm_head = torch.nn.Linear(16, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[end] = 10.0
    [out] = generate.generate_responses(model, tok, [{"id": 0, "prompt": "Which fruit?"}], K=2, temperature=0,
                                        max_new_tokens=5)
    assert out["responses"] == ["", ""] and out["truncated"] == [False, False]


def test_judge_text_is_what_the_official_rank_py_builds(chat_tok):
    kind, tok = chat_tok
    for prompt in ["Which fruit suits the picnic?", "Pick a colour for the party.\nThen say why."]:
        ours = templated_prompt_text(tok, prompt)
        assert ours == official_judge_text(tok, prompt)
        assert ours.startswith(KINDS[kind]["bos"]) and prompt.strip() in ours
    # a prompt with "None" in it: the official code cuts the prompt there; here it stays whole
    prompt = "None of the fruits? Say None."
    assert prompt in templated_prompt_text(tok, prompt) and prompt not in official_judge_text(tok, prompt)


class RecordingJudge:
    """A judge for rank.py (`--judge test_templates:RecordingJudge`) that keeps the prompts it reads."""
    seen = []

    def __init__(self, path):
        pass

    def preferences(self, prompts, responses):
        RecordingJudge.seen += prompts
        return [([[0.5] * len(ys)] * len(ys), None) for ys in responses]


def test_rank_shows_the_judge_the_templated_prompt(tmp_path, chat_tok):
    kind, tok = chat_tok
    tok.save_pretrained(tmp_path / "policy")
    chat = [{"role": "user", "content": "Which fruit suits the picnic?"}]
    write_records(tmp_path / "r.jsonl", [{"id": 0, "prompt": "Pick a colour.", "responses": ["red", "blue"]},
                                         {"id": 1, "prompt": chat, "responses": ["plum", "fig"]}])
    for mode, expected in [("plain", ["Pick a colour.", "Which fruit suits the picnic?"]),
                           ("template", [official_judge_text(tok, "Pick a colour."),
                                         official_judge_text(tok, "Which fruit suits the picnic?")])]:
        RecordingJudge.seen = []
        rank.main(["--responses", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / f"{mode}.jsonl"),
                   "--judge", "test_chat_templates:RecordingJudge", "--judge_prompt", mode,
                   "--template_model", str(tmp_path / "policy")])
        assert RecordingJudge.seen == expected


def test_real_gemma3_tokenizer(gemma_dir):
    """The real Gemma-3 tokenizer (google/gemma-3-270m, the base model: no chat template of its
    own) with the Gemma turn format written above: a response ends with <end_of_turn> (id 106),
    not <eos> (id 1); one <bos>; generation stops there; PairRM's text as the official code's."""
    tok = copy.deepcopy(load_tokenizer(gemma_dir))  # a copy: the loaded one is shared (lm.load_tokenizer)
    assert tok.chat_template is None and tok.eos_token == "<eos>"
    assert response_end_ids(tok) == [tok.eos_token_id]  # a base model without a template: its EOS
    tok.chat_template = GEMMA_TEMPLATE
    check_turn_format(tok, "<end_of_turn>")
    assert response_end_ids(tok) == [106] and tok.eos_token_id == 1
    prompt = "Which fruit suits the picnic?"
    assert templated_prompt_text(tok, prompt) == official_judge_text(tok, prompt) == (
        "<bos><start_of_turn>user\nWhich fruit suits the picnic?<end_of_turn>\n<start_of_turn>model\n")
