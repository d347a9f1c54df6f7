"""Tests run offline from the project root; nothing is fetched from a model hub."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n 2`, the README's test command) the workers share the cores: each gets its
# share of threads, as torchrun's ranks do, instead of every worker taking them all.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))  # tiny_models (judges by module:factory), processes

import pytest  # noqa: E402

# tests/vllm_engine needs the vLLM engine, installed in .venv-vllm: the main environment's run starts
# it there (tests/stages/test_vllm_backend.py) instead of collecting it here
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_engine"]


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The embedded toy world with a short SFT (the tests need a working model, not a good one)."""
    from worlds import toy
    return toy.build_world(tmp_path_factory.mktemp("toy_world"), seed=0, sft_steps=40)


@pytest.fixture(scope="session")
def gemma_dir():
    """The real LM (google/gemma-3-270m from PyPI), converted once per machine into ~/.cache/sppo."""
    from worlds import gemma
    return gemma.converted_model_dir()


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of the given size, mounted for the test: -> mount(size, fill_kib) -> its path."""
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs")
    mounted = []

    def mount(size, fill_kib=None):
        fs = tmp_path / f"fs{len(mounted)}"
        fs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(fs)], check=True)
        mounted.append(fs)
        count = f"count={fill_kib}" if fill_kib else ""
        subprocess.run(f"dd if=/dev/zero of={fs}/filler bs=1k {count} 2>/dev/null; true", shell=True)
        return fs
    yield mount
    for fs in mounted:
        subprocess.run(["umount", "-l", str(fs)])


# The longest files first, in this order: under `-n 2 --dist loadfile` each then overlaps the rest of
# the suite instead of running alone at its end (the real-engine run in .venv-vllm takes minutes).
LONGEST_FIRST = ("test_vllm_backend.py", "test_round_two.py", "test_torchrun.py", "test_hostile_edges.py",
                 "test_instruct_world.py", "test_stages_in_one_process.py", "test_sentiment_world.py",
                 "test_instruct_benchmark.py")


def pytest_configure(config):
    # pytest-xdist hands out the files with the most tests first unless told not to (--loadscope-reorder,
    # on by default for --dist loadfile): that would put the files above, which have few tests, last
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
