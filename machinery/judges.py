"""The judges rank.py can use: a judge turns a prompt's K responses into P[i, j] = P(y_i > y_j | x).

A judge is any object with
    preferences(prompts: list[str], responses: list[list[str]]) -> list[(P, scores)]
where P is a [K, K] tensor (or nested list) and scores a [K] list or None. Built in:
  pairrm  PairRM (Jiang et al. 2023) through llm-blender, the paper's preference model;
  reward  any Bradley-Terry reward model (AutoModelForSequenceClassification, one output).
`module:factory` names any other: `factory(judge_path)` from `module` (the toy world's judge is
`toy:ToyJudge`, the sentiment world's `sentiment:VaderJudge`: a module not found at the top level
is looked up among the built-in worlds, worlds/), so a new judge plugs in without
touching this file. A judge may count `seen` and `cut` responses; rank.py reports the cut ones.
"""
import importlib
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from machinery.flags import P_MODES
from machinery.records import InputError
from sppo_loss import prob_matrix_from_scores

PAIRRM_HUB_NAME = "llm-blender/PairRM"


# ---- PairRM -----------------------------------------------------------------------------------


def llm_blender_compat():
    """Let llm-blender 0.0.2 (written for transformers 4) import and run on transformers 5.

    It uses two names that transformers 5 removed; both are restored as what they were in 4:
      - `transformers.utils.hub.TRANSFORMERS_CACHE`, read at import as the default download dir:
        in transformers 4 an alias of huggingface_hub's cache dir;
      - `tokenizer.batch_encode_plus(texts, **kw)`, called by its collator: in transformers 4 the
        same as `tokenizer(texts, **kw)`.
    Nothing else is patched; applied only when the pairrm judge is built.
    """
    import transformers.utils.hub as hub
    from huggingface_hub import constants
    from transformers import PreTrainedTokenizerBase
    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        hub.TRANSFORMERS_CACHE = constants.HF_HUB_CACHE
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = lambda self, texts, **kw: self(texts, **kw)


def _pad_cat(tensors, value):
    """Concatenate [n, ..., L_b] tensors along dim 0, right-padding the last dim with `value`."""
    width = max(t.shape[-1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[-1]), value=value) for t in tensors])


class PairRMJudge:
    """PairRM: P from a pairwise model that reads (x, y_left, y_right) and gives a logit.

    One forward on the ordered pair (y_i, y_j) gives the logit M[i, j] that y_i (shown first)
    is better; PairRM was trained to output a Bradley-Terry logit for that order. Every ordered
    pair i != j is run, so each unordered pair is seen in both orders, which cancels PairRM's
    position bias. With C = M - M^T (C[i, j] is exactly what llm-blender's `compare(x, y_i, y_j)`
    returns in its default "[A,B]+[B,A]" mode; C[i, i] = 0):

      pairwise  P[i, j] = sigmoid(C[i, j] / 2)   each pair judged on its own, the logits of the
                                             two orders averaged: the paper's P(y_i > y_j | x);
                                             P + P^T = 1, and non-transitive preferences survive.
      scores    s_i = mean_j C[i, j] (the mean over all K, C[i, i] = 0 included), then
                P[i, j] = sigmoid(s_i - s_j): the official SPPO pipeline (blender.rank(...,
                return_scores=True), then a Bradley-Terry matrix of the aggregated scores).

    Default `pairwise`: it is the P the paper defines and analyses (a general preference, not a
    Bradley-Terry one), and it costs the same K(K-1) forwards as `scores`. Use `scores` to
    reproduce the official pipeline's numbers. (`compare` returns the *sum* C of the two orders'
    logits although its docstring says average; the official scores inherit that factor 2.)
    "scores" in the output are the s_i in both modes.

    Length limits, as PairRM itself does them (its collator, unchanged): the prompt is cut to
    `source_maxlength` tokens, and each response to `candidate_maxlength` tokens plus half the
    prompt room left unused (both counts include PairRM's 3 marker/special tokens; the tail is
    dropped). Each prompt's K responses are tokenised together, once, so a response is cut at
    the same token in every pair and both orders, exactly as the official code (one prompt per
    batch) cuts it; the K(K-1) ordered pairs are then built by indexing, and the forwards pack
    pairs of many prompts, sorted by length. `max_length` overrides `candidate_maxlength`.
    """

    def __init__(self, path=None, p_mode="pairwise", max_length=None, batch_size=32, device="cpu"):
        if p_mode not in P_MODES:
            raise InputError(f"unknown p_mode {p_mode!r}; choose from {P_MODES}")
        llm_blender_compat()
        import llm_blender  # imported here: only this judge needs it
        self.blender = llm_blender.Blender(llm_blender.BlenderConfig(device=device, use_tqdm=False))
        try:
            with warnings.catch_warnings():  # dataclasses_json warns about every unset RankerConfig field
                warnings.simplefilter("ignore", RuntimeWarning)
                self.blender.loadranker(str(path or PAIRRM_HUB_NAME), device=device)
        except Exception as e:
            raise InputError(f"could not load PairRM from {path or PAIRRM_HUB_NAME!r}: {e}") from e
        if self.blender.ranker_config.ranker_type != "pairranker":
            raise InputError(f"{path!r} is not a pairranker (ranker_type "
                             f"{self.blender.ranker_config.ranker_type!r}); use --judge reward for reward models")
        self.collator = self.blender.ranker_collator
        if max_length is not None:
            self.collator.candidate_maxlength = max_length
        self.p_mode, self.batch_size, self.device = p_mode, batch_size, device
        self.seen = self.cut = 0  # responses judged / of those cut to the length limit

    def _count_cut(self, ys, features):
        """Count the responses PairRM cut: longer than the candidate width it allowed them."""
        limit = self.collator.candidate_maxlength + (self.collator.source_maxlength
                                                     - features["source_ids"].shape[-1]) // 2
        tok = self.blender.ranker_tokenizer
        self.seen += len(ys)
        self.cut += sum(len(tok(self.collator.candidate_prefix + y)["input_ids"]) > limit for y in ys)

    @torch.no_grad()
    def pair_logits(self, prompts, responses):
        """M[b][i, j]: PairRM's logit that y_i beats y_j, y_i shown first; diagonal 0. -> [B, K, K]."""
        B, K = len(prompts), len(responses[0])
        pairs = torch.tensor([(i, j) for i in range(K) for j in range(K) if i != j])  # [n, 2]
        n = len(pairs)
        per_prompt = []
        for x, ys in zip(prompts, responses):  # each response tokenised once, under its prompt's length budget
            features = self.collator([{"source": x, "candidates": ys}])
            self._count_cut(ys, features)
            per_prompt.append(features)
        pad = self.blender.ranker_tokenizer.pad_token_id
        source_ids = _pad_cat([f["source_ids"].expand(n, -1) for f in per_prompt], pad)  # [B n, Ls]
        source_mask = _pad_cat([f["source_attention_mask"].expand(n, -1) for f in per_prompt], 0)
        cand_ids = _pad_cat([f["candidate_ids"][0] for f in per_prompt], pad).view(B, K, -1)  # [B, K, Lc]
        cand_mask = _pad_cat([f["candidate_attention_mask"][0] for f in per_prompt], 0).view(B, K, -1)
        left, right = pairs[:, 0], pairs[:, 1]  # the K(K-1) ordered pairs by indexing: [B n, Lc] each
        inputs = (source_ids, source_mask, cand_ids[:, left].flatten(0, 1), cand_mask[:, left].flatten(0, 1),
                  cand_ids[:, right].flatten(0, 1), cand_mask[:, right].flatten(0, 1))
        # pairs of similar length share a forward (PairRM trims all-pad columns): less padding
        order = (source_mask.sum(-1) + inputs[3].sum(-1) + inputs[5].sum(-1)).argsort(stable=True)
        logits = torch.empty(B * n, dtype=torch.float64)
        for s in range(0, B * n, self.batch_size):  # pairs of many prompts per forward
            rows = order[s:s + self.batch_size]
            out = self.blender.ranker._forward(*(t[rows].to(self.device) for t in inputs))  # (source, left, right)
            logits[rows] = out["logits"].double().cpu()
        M = torch.zeros(B, K, K, dtype=torch.float64)
        M[:, left, right] = logits.view(B, n)
        return M

    def preferences(self, prompts, responses):
        if len({len(r) for r in responses}) != 1:
            raise InputError("the pairrm judge needs the same K for every prompt of a batch")
        C = self.pair_logits(prompts, responses)
        C = C - C.transpose(-1, -2)  # C[i, j] = M[i, j] - M[j, i]: both orders
        scores = C.mean(dim=-1)
        P = torch.sigmoid(C / 2) if self.p_mode == "pairwise" else prob_matrix_from_scores(scores)
        return [(P[b], scores[b].tolist()) for b in range(len(prompts))]


# ---- Bradley-Terry reward models -------------------------------------------------------------


class RewardJudge:
    """A reward model r(x, y) with one output: P[i, j] = sigmoid(r_i - r_j) (Bradley-Terry).

    Input format: the reward model's own chat template when its tokenizer has one (user: x,
    assistant: y), else the text pair (x, y) as its tokenizer joins pairs. Each response is
    scored alone, so the result does not depend on batching. Sequences longer than `max_length`
    (default: the model's own limit) are cut, the response's tail first.
    """

    def __init__(self, path, max_length=None, batch_size=32, device="cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        if path is None:
            raise InputError("--judge reward needs --judge_path (a sequence-classification reward model)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as e:
            raise InputError(f"could not load a reward model from {path!r}: {e}") from e
        if self.model.config.num_labels != 1:
            raise InputError(f"{path!r} has {self.model.config.num_labels} outputs; a reward model has 1")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = max_length or min(n for n in limits if n)
        self.batch_size, self.device = batch_size, device
        self.seen = self.cut = 0

    def encode(self, prompts, responses):
        """Tokenised (prompt, response) sequences, unpadded, each cut to max_length."""
        tok = self.tokenizer
        if tok.chat_template is not None:
            texts = [tok.apply_chat_template([{"role": "user", "content": x}, {"role": "assistant", "content": y}],
                                             tokenize=False) for x, y in zip(prompts, responses)]
            args, kwargs = (texts,), {"add_special_tokens": False}
            cut = {"truncation": True}
        else:
            args, kwargs, cut = (prompts, responses), {}, {"truncation": "longest_first"}
        full_lengths = [len(ids) for ids in tok(*args, **kwargs)["input_ids"]]
        self.seen += len(full_lengths)
        self.cut += sum(n > self.max_length for n in full_lengths)
        enc = tok(*args, **kwargs, **cut, max_length=self.max_length)
        return [{k: enc[k][n] for k in enc} for n in range(len(full_lengths))]

    @torch.no_grad()
    def rewards(self, prompts, responses):
        """r(x, y) for each (prompt, response) pair -> [N] float64."""
        seqs = self.encode(prompts, responses)
        out = []
        for s in range(0, len(seqs), self.batch_size):
            batch = self.tokenizer.pad(seqs[s:s + self.batch_size], return_tensors="pt")
            out.append(self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits[:, 0].double().cpu())
        return torch.cat(out)

    def preferences(self, prompts, responses):
        flat_x = [x for x, ys in zip(prompts, responses) for _ in ys]
        r = self.rewards(flat_x, [y for ys in responses for y in ys]).tolist()
        out, start = [], 0
        for ys in responses:
            scores = torch.tensor(r[start:start + len(ys)], dtype=torch.float64)
            out.append((prob_matrix_from_scores(scores), scores.tolist()))
            start += len(ys)
        return out


# ---- choosing a judge ------------------------------------------------------------------------


def make_judge(spec: str, path=None, p_mode="pairwise", max_length=None, batch_size=32, device="cpu"):
    """A judge: `pairrm`, `reward`, or `module:factory` (factory(path) -> judge; options unused)."""
    if spec == "pairrm":
        return PairRMJudge(path, p_mode=p_mode, max_length=max_length, batch_size=batch_size, device=device)
    if spec == "reward":
        return RewardJudge(path, max_length=max_length, batch_size=batch_size, device=device)
    judge = plugin_call(spec, "the factory", judge_factory(spec), path)
    if not callable(getattr(judge, "preferences", None)):
        raise InputError(f"--judge {spec}: the factory returned a {type(judge).__name__}, which has no "
                         "preferences(prompts, responses) method")
    return judge


def is_plugin(spec) -> bool:
    """A `module:factory` judge: code this project did not write."""
    return spec not in ("pairrm", "reward") and ":" in str(spec)


def plugin_call(spec, what, fn, *args):
    """fn(*args), code of the plug-in judge `spec`: an exception it raises ends the stage in one line
    naming the judge and the exception (exit 2), its traceback shown with SPPO_TRACEBACK=1. A judge
    server that is down is the user's to fix, not a bug of ours to trace."""
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"--judge {spec}: {what} raised {type(e).__name__}: {e}") from e


def judge_factory(spec: str):
    """The factory a `module:factory` judge spec names, imported now: a typo fails before any work."""
    if spec in ("pairrm", "reward"):
        return None
    module_name, _, factory = spec.partition(":")
    if not (module_name and factory):
        raise InputError(f"--judge {spec!r}: unknown judge; give pairrm, reward or module:factory")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name or importlib.util.find_spec(f"worlds.{module_name}") is None:
            raise InputError(f"--judge {spec!r}: cannot import module {module_name!r} ({e})") from e
        module = importlib.import_module(f"worlds.{module_name}")  # a built-in world's judge: toy:ToyJudge
    except ImportError as e:
        raise InputError(f"--judge {spec!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # the module's own code failed (a syntax error, a raise at import): as plugin_call
        raise InputError(f"--judge {spec}: importing module {module_name!r} raised {type(e).__name__}: {e}") from e
    if not callable(getattr(module, factory, None)):
        raise InputError(f"--judge {spec!r}: module {module_name!r} has no factory {factory!r}")
    return getattr(module, factory)
