"""The language-model side: loading, chat templates, token ids, batches, sequence log-probs.

What the algorithm needs of a language model: the ids of a prompt as the model reads it
(`prompt_token_ids`: through its chat template, one BOS, user text never a control token), the ids
of a response as it is trained on (`response_token_ids`: plus the end-of-turn tokens when it ended
by itself), a padded batch (`collate`) and log pi(y | x) summed over the response (`sequence_logps`).
torch and transformers are imported inside the functions that use them.
"""
import contextlib
import functools
import hashlib
import inspect
import re
import weakref
from pathlib import Path

from machinery.flags import PROMPT_FORMATS
from machinery.records import InputError, _fail, record_line


_TOKENIZERS = {}  # (directory, its tokenizer files' contents) -> the tokenizer loaded from them, in this process


def load_tokenizer(model_dir):
    """The model directory's tokenizer, with a pad token. Loaded once per process per directory
    and file contents: a large vocabulary's tokenizer is slow to load, and an iteration's stages
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
    check_model_files(model_dir, flag="")  # transformers would load a missing weight as random numbers
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    return model.to(device)


def check_model_files(model_dir, flag="--model"):
    """A local model directory's files, checked before any work and before every load (HF, a fresh
    vLLM engine, the kept engine's weight reload): config.json is a config transformers takes, every
    weight file's header reads and ends where the file does, the weights are exactly the tensors
    config.json's architecture has (none missing, none unknown), each of the shape config.json gives
    it, and the tokenizer's ids fit the embedding. (Without this, a damaged directory is a traceback
    deep in loading or an IndexError in the forward, or worse: a missing weight silently randomly
    initialised by transformers and by a fresh vLLM engine, or left as the previous policy's by the
    kept engine's reload.) A hub name is not checked here. flag: how the message names the directory."""
    import json
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(model_dir)
    where = f"{flag} {model_dir}".strip()
    if not path.is_dir():
        return
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):  # the architecture's tensors, no memory: state_dict holds no non-persistent buffer
            model = AutoModelForCausalLM.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as e:  # transformers raises what the config's values make it raise (TypeError, ValueError, ...)
        raise InputError(f"{where}: config.json is not a model config transformers can build "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    # a tied weight (an LM head tied to the embedding: Gemma-3, SmolLM2) is not saved, or saved as a copy
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    may_miss = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    may_add = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    found_in = {}  # weight name -> the file that holds it
    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
            [p.name for p in path.glob("*.safetensors")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{where}: {index.name} is not a safetensors index ({e})") from e
    if not files:
        raise InputError(f"{where}: no *.safetensors weights in it")
    for name in files:
        weights = path / name
        try:
            size = weights.stat().st_size
            with open(weights, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len)) if 0 < header_len < size else None
            end = 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if end != size:
                raise InputError(f"{where}: {name} is truncated or padded (its header says "
                                 f"{end} bytes, the file has {size})")
            with safe_open(weights, "pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except InputError:
            raise
        except Exception as e:  # a missing, empty or garbled file: OSError, SafetensorError, bad JSON
            raise InputError(f"{where}: {name} is not a readable safetensors file "
                             f"({type(e).__name__}: {str(e).strip()[:200]})") from e
        for key, shape in found.items():
            if key not in shapes and not any(p.search(key) for p in may_add):
                raise InputError(f"{where}: {name}: {key} is not a tensor of the {type(model).__name__} "
                                 f"config.json describes: the config and the weights disagree")
            if key in shapes and shapes[key] != shape:
                raise InputError(f"{where}: {name}: {key} has shape {list(shape)}, but config.json "
                                 f"makes it {list(shapes[key])}: the config and the weights disagree")
            found_in[key] = name
    missing = [k for k in shapes if k not in found_in and k not in tied and not any(p.search(k) for p in may_miss)]
    if missing:
        raise InputError(f"{where}: no weight file holds {missing[0]}" + (f" (nor {len(missing) - 1} more)" if
                         len(missing) > 1 else "") + f", a tensor of the {type(model).__name__} config.json describes: "
                         "it would be loaded as random numbers")
    rows = next((v[0] for k, v in shapes.items() if k.endswith("embed_tokens.weight")), None)
    vocab = load_tokenizer(path).get_vocab()
    if rows is not None and vocab and max(vocab.values()) >= rows:
        raise InputError(f"{where}: the tokenizer has token id {max(vocab.values())}, but the embedding "
                         f"has {rows} rows")


def model_context(model_dir):
    """The longest sequence the model takes (max_position_embeddings), or None if it does not say."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: could not read the model config ({str(e).strip().splitlines()[0]})") from e
    return getattr(config.get_text_config(), "max_position_embeddings", None)


# ---- prompts and responses as token ids --------------------------------------------------------


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


def stop_token_ids(eos, tokenizer, prompt_format="auto") -> set:
    """What ends a sampled response: the generation config's EOS (`eos`: an id, a list or None), the
    tokenizer's, and the special token that ends an assistant's turn in the chat template (<|eot_id|>,
    <end_of_turn>: the one training puts at the end of a response)."""
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return ids | {tokenizer.eos_token_id, response_end_ids(tokenizer, prompt_format)[-1]}


def row_seed(seed: int, prompt_id, k: int) -> int:
    """A 63-bit seed from (seed, prompt id, sample index), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- batches and log-probs ----------------------------------------------------------------------


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


def sequence_logps(model, batch, device=None):
    """Summed log pi(response | prompt) per sequence: batch from `collate` -> [N] (fp32).

    Token t is scored from position t-1; a target counts only if it is a response token and
    the position predicting it is real (never a pad), whatever the padding side. The LM head
    runs only from the first position that predicts a response token (`logits_to_keep`).
    With `device`, the batch is read where it is (collate's CPU tensors) and sent there: which
    positions count is then worked out on the host, so the forward on a GPU waits for nothing
    (a boolean-mask index, nonzero() and int() of a GPU tensor each wait for the GPU to finish
    all queued work, to learn a size). The positions are taken in the same row-major order as
    the mask's, so the result is the same bit for bit. (One wait is transformers' own: its SDPA
    mask asks whether a padded batch's attention mask is all ones, masking_utils.py
    _ignore_causal_mask_sdpa.)
    """
    import torch
    import torch.nn.functional as F
    predicts = (batch["response_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()  # [N, L-1]: t predicts t+1
    first = int(predicts.any(0).int().argmax())  # 0 if no response token at all: then nothing counts
    keep = predicts.shape[1] - first + 1  # positions first .. L-1; the last one predicts nothing
    rows, cols = predicts[:, first:].nonzero(as_tuple=True)  # [n] each: the counted (sequence, kept position)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if device is not None:
        inputs, rows, cols = {k: v.to(device) for k, v in inputs.items()}, rows.to(device), cols.to(device)
    targets = inputs["input_ids"][rows, cols + first + 1]  # [n]
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(**inputs, use_cache=False, **kwargs).logits[:, -keep:-1]
    token_logps = -F.cross_entropy(logits[rows, cols].float(), targets, reduction="none")  # log pi(y_t | x, y_<t), fp32
    return torch.zeros(len(predicts), dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)


# ---- speed: the LM head on the CPU ---------------------------------------------------------------

# From this vocabulary size up, training on the CPU runs the LM head through cpu_lm_head; below it
# the head is a small part of the work and nn.Linear's own layout is kept.
LARGE_VOCAB = 32768


@contextlib.contextmanager
def cpu_lm_head(model):
    """While the block runs, the model's LM head computes its logits as (W h^T)^T, not h W^T.

    The same dot products (weight [V, d], hidden [n, d]), in the layout the CPU's GEMM runs faster
    when V is large and n small; the result is the same contiguous [..., V] tensor, so nothing
    around it changes. The head runs inside the model's forward, where FSDP's hooks hold its weight
    gathered. Only for a bias-free nn.Linear head on the CPU; anything else is left as it is.
    Generation uses it on the CPU, training from LARGE_VOCAB up.
    """
    import torch
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.device.type != "cpu":
        yield
        return
    head.forward = lambda hidden: ((head.weight @ hidden.reshape(-1, hidden.shape[-1]).T)
                                   .T.contiguous().reshape(*hidden.shape[:-1], -1))
    try:
        yield
    finally:
        del head.forward  # back to nn.Linear.forward
