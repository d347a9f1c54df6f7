"""Tiny, randomly initialised judges built locally for the judge tests (nothing from the hub).

- a PairRM-shaped ranker: a 2-layer DeBERTa-v2 backbone with a sentencepiece tokenizer trained
  here, wrapped and saved in the layout llm-blender's `Blender.loadranker(dir)` reads
  (config.json = RankerConfig with model_name = the backbone dir, model.safetensors = weights);
- a text-pair reward model (DeBERTa-v2 sequence classification, no chat template);
- a chat-template reward model (Llama sequence classification, its own word-level tokenizer).
"""
import io
import json
from pathlib import Path

import torch

CORPUS = [
    "which fruit suits the picnic", "pick a colour for the party", "name a drink for the dinner",
    "the apple is sweet and the pear is soft", "a plum or a fig would be fine", "red blue green grey brown",
    "tea milk juice soda water", "the quick brown fox jumps over the lazy dog", "i think you should bring a lime",
    "that is a good question and here is a long answer with many words in it",
]
PAIRRM_SOURCE_MAXLENGTH = 24  # tokens, PairRM's own limits scaled down (real PairRM: 1224 and 412)
PAIRRM_CANDIDATE_MAXLENGTH = 16


def train_sentencepiece_dir(out_dir: Path) -> Path:
    """A DeBERTa-v3-style tokenizer dir (spm.model, [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3) trained on CORPUS."""
    import sentencepiece as spm
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=150, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], hard_vocab_limit=False, minloglevel=2)
    (out_dir / "spm.model").write_bytes(buf.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm", "tokenizer_class": "DebertaV2Tokenizer"}))
    return out_dir


def tiny_deberta_config(vocab_size, **kw):
    from transformers import DebertaV2Config
    return DebertaV2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=64, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, initializer_range=0.2,
        pad_token_id=0, **kw)


def build_tiny_pairrm(root: Path, seed=0) -> Path:
    """A random PairRM-shaped ranker in `root/ranker` (backbone in `root/backbone`)."""
    from transformers import AutoTokenizer, DebertaV2Model
    import safetensors.torch
    from judges import llm_blender_compat
    llm_blender_compat()
    from llm_blender import RankerConfig
    from llm_blender.pair_ranker.model_util import build_collator, build_ranker, build_tokenizer

    backbone = train_sentencepiece_dir(root / "backbone")
    torch.manual_seed(seed)
    DebertaV2Model(tiny_deberta_config(len(AutoTokenizer.from_pretrained(backbone)))).save_pretrained(backbone)
    config = RankerConfig(ranker_type="pairranker", model_type="deberta", model_name=str(backbone),
                          source_maxlength=PAIRRM_SOURCE_MAXLENGTH, candidate_maxlength=PAIRRM_CANDIDATE_MAXLENGTH,
                          n_tasks=1, fp16=False)
    # llm-blender's own builders, as Blender.loadranker calls them: the collator adds PairRM's
    # marker tokens to the tokenizer, the ranker resizes the embeddings to match.
    tokenizer = build_tokenizer(config.model_name)
    build_collator("pairranker", tokenizer, config.source_maxlength, config.candidate_maxlength)
    ranker = build_ranker("pairranker", "deberta", config.model_name, None, config, tokenizer)
    with torch.no_grad():  # a random head gives logits ~0.1; scale up so P spreads over (0, 1)
        ranker.head_layer[-1].weight.mul_(40.0)
    out = root / "ranker"
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(ranker, str(out / "model.safetensors"))
    fields = {k: v for k, v in config.to_dict().items() if k not in ("cache_dir", "load_checkpoint", "device")}
    (out / "config.json").write_text(json.dumps(fields, indent=1))
    return out


def build_tiny_pair_reward(root: Path, seed=1) -> Path:
    """A random DeBERTa-v2 reward model (one output) reading the text pair (prompt, response)."""
    from transformers import AutoTokenizer, DebertaV2ForSequenceClassification
    out = train_sentencepiece_dir(root / "pair_rm")
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(tiny_deberta_config(len(tokenizer), num_labels=1))
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_chat_reward(root: Path, seed=2) -> Path:
    """A random Llama reward model (one output) with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    words = sorted({w for line in CORPUS for w in line.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% endfor %}{{ eos_token }}")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=2, eos_token_id=3, initializer_range=0.2)
    model = LlamaForSequenceClassification(config)
    out = root / "chat_rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class ConstJudge:
    """A `module:factory` judge for the plug-in path: every response ties."""

    def __init__(self, path=None):
        self.path = path

    def preferences(self, prompts, responses):
        return [([[0.5] * len(r) for _ in r], None) for r in responses]


class NotAPreferenceJudge:
    """A `module:factory` judge whose P breaks P[i][i] = 1/2: rank.py must stop with one line."""

    def __init__(self, path=None):
        self.path = path

    def preferences(self, prompts, responses):
        return [([[0.9] * len(r) for _ in r], None) for r in responses]
