"""Every stage's command line, in one module that does not load torch.

generate.py, rank.py and train.py parse their argv with the parsers here; iterate.py builds its
own command line from the same parsers (it forwards each stage flag and checks each value and
choice before torch has loaded, ~0.1 s instead of ~3 s). So a flag, its type, its choices and
its default are written once, here. Defaults are the paper's values (section 5) where the paper
has one; iterate.py's presets list only what they change.
"""
import argparse

from common import (PROMPT_FORMATS, finite_float, fraction, nonneg_float, nonneg_int, positive_float, positive_int,
                    probability)

LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard", "sppo_all", "dpo", "ipo")  # sppo_loss.preference_loss
P_MODES = ("pairwise", "scores")  # how rank.py's PairRM judge turns its logits into P
DTYPES = ("auto", "float32", "bfloat16")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`prog: error: argument --x: ...`, exit 2)
    instead of the usage block first: iterate.py's usage alone is 40 lines. --help shows it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def generate_parser(description=None):
    ap = Parser(prog="generate.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (or hub name) of pi_t")
    ap.add_argument("--prompts", required=True, help="JSONL with id and prompt")
    ap.add_argument("--out", required=True, help="JSONL to write")
    ap.add_argument("--K", type=positive_int, default=5, help="samples per prompt (paper: 5)")
    ap.add_argument("--temperature", type=nonneg_float, default=1.0, help="paper 1.0, official code 0.7; 0 = greedy")
    ap.add_argument("--top_p", type=probability, default=1.0, help="paper 1.0, official code 0.9")
    ap.add_argument("--top_k", type=nonneg_int, default=0, help="0 = no top-k filter")
    ap.add_argument("--max_new_tokens", type=positive_int, default=512)
    ap.add_argument("--prompt_format", default="auto", choices=PROMPT_FORMATS,
                    help="chat: the chat template; plain: BOS + prompt text, the response continues it (base "
                         "models); auto: chat if the tokenizer has a template")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=positive_int, default=16, help="prompts per generate call (x K rows)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="vllm: GPUs, requirements-vllm.txt")
    ap.add_argument("--tensor_parallel_size", type=positive_int, default=1, help="vllm: GPUs per engine")
    return ap


def rank_parser(description=None):
    ap = Parser(prog="rank.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", required=True, help="JSONL from generate.py")
    ap.add_argument("--out", required=True, help="ranked JSONL to write")
    ap.add_argument("--judge", required=True, type=judge_spec,
                    help="pairrm, reward or module:factory (the toy world: toy:ToyJudge)")
    ap.add_argument("--judge_path", default=None,
                    help="what the judge loads: PairRM dir or hub name (default llm-blender/PairRM), "
                         "reward model dir, world file")
    ap.add_argument("--p_mode", choices=P_MODES, default="pairwise",
                    help="pairrm: P = sigmoid of each pair's mean two-order logit (paper) or of score differences (official)")
    ap.add_argument("--judge_max_length", type=positive_int, default=None,
                    help="pairrm: tokens per response (its candidate_maxlength); reward: tokens per sequence")
    ap.add_argument("--judge_batch_size", type=positive_int, default=32, help="sequences per judge forward")
    ap.add_argument("--judge_device", default=None, help="default: cuda:LOCAL_RANK on GPUs, else cpu")
    ap.add_argument("--batch_size", type=positive_int, default=16, help="prompts per judge call")
    ap.add_argument("--judge_prompt", choices=("plain", "template"), default="plain",
                    help="what the judge reads as the prompt: the plain text (last user message), or the policy's "
                         "chat template up to the answer, special-token text included, as the official SPPO rank.py")
    ap.add_argument("--template_model", help="--judge_prompt template: the model dir or hub name whose tokenizer's "
                                             "chat template renders the prompt")
    return ap


def judge_spec(text):
    """pairrm, reward or module:factory; whether the module has the factory is checked when it is imported."""
    module, colon, factory = text.partition(":")
    if text not in ("pairrm", "reward") and not (colon and module and factory):
        raise argparse.ArgumentTypeError(f"expected pairrm, reward or module:factory, got {text!r}")
    return text


def train_parser(description=None):
    ap = Parser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir of pi_t (start and reference)")
    ap.add_argument("--ranked", required=True, help="JSONL from rank.py")
    ap.add_argument("--out", required=True, help="directory for pi_{t+1}")
    ap.add_argument("--loss_type", default="sppo", choices=LOSS_TYPES)
    ap.add_argument("--eta", type=finite_float, default=1000.0, help="SPPO step size (official: 1000, i.e. beta=1e-3)")
    ap.add_argument("--beta", type=positive_float, default=0.1, help="DPO/IPO beta")
    ap.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw"])
    ap.add_argument("--lr", type=nonneg_float, default=5e-7)
    ap.add_argument("--lr_schedule", default="linear", choices=["linear", "constant"], help="after warmup")
    ap.add_argument("--warmup_ratio", type=fraction, default=0.1)
    ap.add_argument("--epochs", type=positive_int, default=1)
    ap.add_argument("--global_batch", type=positive_int, default=64, help="prompts per optimizer step, all ranks")
    ap.add_argument("--micro_batch", type=positive_int, default=8,
                    help="prompts per forward on one rank; gradients accumulate over ceil(global_batch / world / micro_batch)")
    ap.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max grad norm; 0 = off")
    ap.add_argument("--max_prompt_length", type=positive_int, default=512,
                    help="prompt tokens kept (the last ones; longer prompts are cut, counted and reported)")
    ap.add_argument("--max_length", type=positive_int, default=1024, help="prompt + response tokens")
    ap.add_argument("--prompt_format", default="auto", choices=PROMPT_FORMATS,
                    help="as generate.py: chat template, plain text (base models), or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="compute dtype; weights, gradient reduction and optimizer stay fp32. auto: bfloat16 on GPU")
    ap.add_argument("--freeze_embeddings", action=argparse.BooleanOptionalAction, default=False,
                    help="keep the input embedding (and a tied LM head) fixed: no gradient or optimizer state for it")
    ap.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="recompute each decoder layer in backward")
    ap.add_argument("--cpu_offload", action=argparse.BooleanOptionalAction, default=False,
                    help="FSDP2 keeps parameters, grads, optimizer on CPU (torchrun, GPU)")
    ap.add_argument("--save_every", type=nonneg_int, default=0, help="resumable checkpoint every N steps and at the end (0: none)")
    ap.add_argument("--peak_tflops", type=positive_float, default=None,
                    help="peak TFLOP/s of one device, for the MFU estimate (default: known GPUs; none on CPU)")
    return ap


STAGE_PARSERS = {"generate": generate_parser, "rank": rank_parser, "train": train_parser}
