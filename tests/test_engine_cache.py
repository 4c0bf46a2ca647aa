"""The engine cache: stable keys, atomic builds, and one build per key across processes (real file locks)."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from sweep.backends.cache import EngineCache, engine_key

BASE = {
    "model": {"hub_id": "Qwen/Qwen2.5-7B-Instruct", "revision": "abc"},
    "backend": "compiled",
    "libraries": {"torch": "2.11.0", "transformers": "5.17.0"},
    "options": {"max_batch_size": 8, "max_seq_len": 2048, "compile_mode": "reduce-overhead"},
    "dtype": "float16",
    "gpu": {"gpu_name": "NVIDIA H200", "gpu_compute_capability": "9.0"},
}


def test_key_is_stable_and_ignores_dict_order():
    reordered = {k: BASE[k] for k in reversed(list(BASE))}
    reordered["options"] = dict(reversed(list(BASE["options"].items())))
    assert engine_key(BASE) == engine_key(reordered) == engine_key(json.loads(json.dumps(BASE)))


@pytest.mark.parametrize(
    "path, value",
    [
        (("model", "revision"), "def"),
        (("model", "hub_id"), "Qwen/Qwen2.5-0.5B-Instruct"),
        (("backend",), "hf"),
        (("libraries", "torch"), "2.12.0"),
        (("libraries", "transformers"), "5.18.0"),
        (("options", "max_batch_size"), 16),
        (("options", "compile_mode"), "max-autotune"),
        (("dtype",), "bfloat16"),
        (("gpu", "gpu_name"), "NVIDIA H100 80GB HBM3"),
        (("gpu", "gpu_compute_capability"), "8.0"),
    ],
)
def test_key_changes_with_every_input(path, value):
    changed = json.loads(json.dumps(BASE))
    node = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    assert engine_key(changed) != engine_key(BASE)


def write_engine(directory: Path) -> dict:
    (directory / "engine.bin").write_bytes(b"x" * 1000)
    return {"artifact": "engine.bin"}


def test_miss_builds_then_hit_reuses(tmp_path):
    cache = EngineCache(tmp_path)
    first = cache.get_or_build("hf", BASE, write_engine)
    second = cache.get_or_build("hf", BASE, lambda d: pytest.fail("a hit must not build"))
    assert not first.hit and second.hit
    assert first.path == second.path == tmp_path / "hf" / engine_key(BASE)
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["key_inputs"] == BASE and manifest["artifact"] == "engine.bin"
    assert second.manifest == manifest


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = EngineCache(tmp_path)

    def broken(directory: Path) -> dict:
        (directory / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get_or_build("hf", BASE, broken)
    assert [p.name for p in (tmp_path / "hf").iterdir() if not p.name.endswith(".lock")] == []
    assert not cache.get_or_build("hf", BASE, write_engine).hit


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    key = engine_key(BASE)
    (tmp_path / "hf" / f".tmp-{key}-dead").mkdir(parents=True)
    (tmp_path / "hf" / key).mkdir()  # renamed but without a manifest: not a finished engine
    entry = EngineCache(tmp_path).get_or_build("hf", BASE, write_engine)
    assert not entry.hit and (entry.path / "engine.bin").is_file()
    assert not list((tmp_path / "hf").glob(".tmp-*"))


def slow_build_in_process(root: str, counter: str, result: str) -> None:
    def build(directory: Path) -> dict:
        with open(counter, "a") as fh:
            fh.write("built\n")
        time.sleep(1.5)  # long enough that the other process arrives while this one holds the lock
        return write_engine(directory)

    entry = EngineCache(Path(root)).get_or_build("hf", BASE, build)
    Path(result).write_text(json.dumps({"hit": entry.hit, "path": str(entry.path)}))


def test_two_processes_build_the_same_key_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    counter = tmp_path / "builds.txt"
    procs = [
        ctx.Process(target=slow_build_in_process, args=(str(tmp_path / "cache"), str(counter), str(tmp_path / f"r{i}")))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text().splitlines() == ["built"]
    results = [json.loads((tmp_path / f"r{i}").read_text()) for i in range(2)]
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]


def test_an_artifact_that_records_absolute_paths_names_the_final_directory(tmp_path):
    """vLLM's compile-cache index records where each compiled graph was saved (on a GPU, an absolute path). The
    build runs in a temporary directory; the index must name the directory the engine is served from after the
    rename, as a second run (a cache hit) loads the graphs from there. vLLM itself cannot compile graphs here: the
    index is written by hand in the format vLLM writes (a Python literal holding (key, path) handles)."""
    from sweep.backends.cache import final_dir
    from sweep.backends.vllm.backend import COMPILE_INDEX, relocate_compile_index

    def build(engine_dir: Path) -> dict:
        graphs = engine_dir / "vllm_cache" / "torch_compile_cache" / "0fe8c8689d" / "rank_0_0" / "backbone"
        graphs.mkdir(parents=True)
        (graphs / "artifact_compile_range_1_8192_subgraph_0").write_bytes(b"graph")
        handle = ("artifact_compile_range_1_8192_subgraph_0", str(graphs / "artifact_compile_range_1_8192_subgraph_0"))
        (graphs / COMPILE_INDEX).write_text(repr({(1, 8192, 0, "inductor_standalone"): {"graph_handle": handle}}))
        relocate_compile_index(engine_dir / "vllm_cache", engine_dir, final_dir(engine_dir))
        return {}

    entry = EngineCache(tmp_path).get_or_build("vllm", BASE, build)
    (index,) = entry.path.rglob(COMPILE_INDEX)
    (handle,) = [value["graph_handle"] for value in eval(index.read_text()).values()]
    assert Path(handle[1]).is_file() and Path(handle[1]).is_relative_to(entry.path.absolute())
    assert ".tmp-" not in index.read_text()
    again = EngineCache(tmp_path).get_or_build("vllm", BASE, build)
    assert again.hit  # the rewritten index is part of the checksummed entry
