"""Checkpoints in and out: layouts, sharding, atomicity, bad input, pickle, PEFT LoRA."""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polytask.errors import CheckpointError, ConfigError, DataError, StorageError
from polytask.merging import ModelInput, merge_checkpoints, merge_state_dicts, open_checkpoint
from polytask.merging.writer import ShardedWriter, parse_size, remove_stale_partials


def _read_dir(path):
    with open_checkpoint(path) as c:
        return {n: c.load(n) for n in c.names()}


def _expected(method, base, models, params=None, weights=None):
    return merge_state_dicts(method, base, models, params, weights)


@pytest.mark.parametrize("layout", ["file", "hf", "sharded"])
def test_merge_reads_every_layout_and_matches_the_in_memory_merge(make_family, tmp_path, layout):
    base_path, paths, base, models = make_family(3, layout)
    out = tmp_path / "out"
    summary = merge_checkpoints(base_path, [ModelInput(str(p), w) for p, w in zip(paths, [1, 0.5, 2], strict=True)],
                                "ties", out, {"density": 0.5, "lambda": 0.7}, options={"fsync": False})
    got = _read_dir(out)
    want = _expected("ties", base, models, {"density": 0.5, "lambda": 0.7}, [1, 0.5, 2])
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert summary["tensors_merged"] == 4 and summary["tensors_copied"] == 1  # position_ids is copied
    if layout != "file":  # config and tokenizer files travel with the weights
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in out.iterdir()}
    assert json.loads((out / "polytask_merge.json").read_text())["method"] == "ties"


def test_sharded_output_round_trip_with_index(make_family, tmp_path):
    base_path, paths, base, models = make_family(2, "hf")
    out = tmp_path / "out"
    merge_checkpoints(base_path, [str(p) for p in paths], "task_arithmetic", out, {"lambda": 0.5},
                      shard_size=200, options={"fsync": False})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    want = _expected("task_arithmetic", base, models, {"lambda": 0.5})
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for name, shard in index["weight_map"].items():  # each shard is a valid safetensors file for the library
        with safe_open(out / shard, "pt") as f:
            assert torch.equal(f.get_tensor(name), want[name])
    assert set(index["weight_map"]) == set(want)


def test_writer_leaves_nothing_behind_on_failure(tmp_path):
    out = tmp_path / "out"
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError), ShardedWriter(out, entries, 100) as w:
        w.write("a", torch.ones(2))
        raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []
    with ShardedWriter(out, entries, 100) as w:
        w.write("b", torch.ones(3))
        with pytest.raises(CheckpointError, match="'a' was never written"):
            w.commit()


def test_existing_output_is_kept_unless_overwrite(make_family, tmp_path):
    base_path, paths, *_ = make_family(1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        merge_checkpoints(base_path, [str(paths[0])], "task_arithmetic", out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_checkpoints(base_path, [str(paths[0])], "task_arithmetic", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _no_output(tmp_path):
    return not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_shape_mismatch_names_file_and_tensor(make_family, tmp_path, write_state):
    base_path, paths, _base, models = make_family(2)
    bad = dict(models[1])
    bad["layer.0.linear.weight"] = torch.zeros(6, 5)
    bad_path = write_state(tmp_path / "bad", bad)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor 'layer\.0\.linear\.weight' has shape"):
        merge_checkpoints(base_path, [str(paths[0]), str(bad_path)], "ties", tmp_path / "out")
    assert _no_output(tmp_path)


def test_dtype_mismatch_names_file_and_tensor(make_family, tmp_path, write_state):
    base_path, _paths, _base, models = make_family(1)
    bad = {**models[0], "layer.1.linear.weight": models[0]["layer.1.linear.weight"].half()}
    bad_path = write_state(tmp_path / "bad", bad)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor 'layer\.1\.linear\.weight' is torch\.float16"):
        merge_checkpoints(base_path, [str(bad_path)], "task_arithmetic", tmp_path / "out")
    assert _no_output(tmp_path)


def test_missing_and_extra_tensors_name_file_and_tensor(make_family, tmp_path, write_state):
    base_path, _paths, _base, models = make_family(1)
    missing = {k: v for k, v in models[0].items() if k != "layer.0.linear.bias"}
    p = write_state(tmp_path / "missing", missing)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: tensor 'layer\.0\.linear\.bias' is missing"):
        merge_checkpoints(base_path, [str(p)], "task_arithmetic", tmp_path / "out")
    extra = {**models[0], "surprise": torch.zeros(2)}
    p = write_state(tmp_path / "extra", extra)
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: tensor 'surprise' is not in the base"):
        merge_checkpoints(base_path, [str(p)], "task_arithmetic", tmp_path / "out")
    assert _no_output(tmp_path)


def test_truncated_and_corrupt_files_are_clear_errors(make_family, tmp_path):
    base_path, paths, *_ = make_family(1)
    data = paths[0].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: truncated file: tensor '.+' needs bytes"):
        merge_checkpoints(base_path, [str(truncated)], "task_arithmetic", tmp_path / "out")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors: corrupt safetensors header"):
        merge_checkpoints(base_path, [str(corrupt)], "task_arithmetic", tmp_path / "out")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: not a safetensors file"):
        open_checkpoint(tiny)
    assert _no_output(tmp_path)


def test_nan_check_is_on_by_default_and_removes_partial_output(make_family, tmp_path, write_state):
    base_path, _paths, _base, models = make_family(1)
    nan = dict(models[0])
    nan["layer.1.linear.weight"] = nan["layer.1.linear.weight"].clone()
    nan["layer.1.linear.weight"][2, 3] = float("nan")
    p = write_state(tmp_path / "nan", nan)
    with pytest.raises(DataError, match=r"nan\.safetensors: tensor 'layer\.1\.linear\.weight' contains NaN or inf"):
        merge_checkpoints(base_path, [str(p)], "task_arithmetic", tmp_path / "out", shard_size=50)
    assert _no_output(tmp_path)
    merge_checkpoints(base_path, [str(p)], "task_arithmetic", tmp_path / "out", options={"check_finite": False})
    assert torch.isnan(_read_dir(tmp_path / "out")["layer.1.linear.weight"]).any()  # opted out: merged as given


def test_an_overflowing_output_is_refused(make_family, tmp_path, write_state):
    base_path, _paths, base, models = make_family(1)
    big = {**models[0], "embed.weight": base["embed.weight"] + 1e5}  # finite in float32, inf in float16
    p = write_state(tmp_path / "big", big)
    with pytest.raises(DataError, match=r"merged tensor 'embed\.weight' contains NaN or inf.*float16"):
        merge_checkpoints(base_path, [str(p)], "task_arithmetic", tmp_path / "out", out_dtype="float16")
    assert _no_output(tmp_path)


def test_vocabulary_mismatch_fails_or_merges_shared_rows(make_family, tmp_path, write_state):
    base_path, paths, base, models = make_family(2, "hf")
    bigger = {**models[1], "embed.weight": torch.cat([models[1]["embed.weight"], torch.ones(3, 6)])}
    p = write_state(tmp_path / "bigger", bigger, "hf")
    with pytest.raises(CheckpointError, match=r"mismatched vocabulary sizes: tensor 'embed\.weight' has 15 rows"):
        merge_checkpoints(base_path, [str(paths[0]), str(p)], "task_arithmetic", tmp_path / "out")
    assert _no_output(tmp_path)
    merge_checkpoints(base_path, [str(paths[0]), str(p)], "task_arithmetic", tmp_path / "out",
                      options={"vocab": "shared"})
    got = _read_dir(tmp_path / "out")
    want = _expected("task_arithmetic", base, [models[0], models[1]])
    assert torch.equal(got["embed.weight"], want["embed.weight"]) and got["embed.weight"].shape[0] == 12
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 12


@pytest.mark.parametrize("name,shape", [("layer.0.linear.weight", (5, 6)), ("layer.0.linear.bias", (5,))])
def test_rows_missing_from_a_non_vocabulary_tensor_are_a_shape_mismatch(make_family, tmp_path, write_state,
                                                                          name, shape):
    base_path, paths, _base, models = make_family(2, "hf")
    short = {**models[1], name: models[1][name][:shape[0]]}
    p = write_state(tmp_path / "short", short, "hf")
    for options in ({}, {"vocab": "shared"}):  # vocab: shared never cuts a tensor that is not a vocabulary
        with pytest.raises(CheckpointError, match=rf"short/model\.safetensors: tensor '{re.escape(name)}' has "
                                                  rf"shape {re.escape(str(list(shape)))}"):
            merge_checkpoints(base_path, [str(paths[0]), str(p)], "task_arithmetic", tmp_path / "out",
                              options=options)
        assert _no_output(tmp_path)


def test_vocabulary_tensors_come_from_the_config(tmp_path):
    from polytask.merging.stream import vocabulary_tensors

    state = {"model.embed_tokens.weight": torch.zeros(30, 4), "lm_head.weight": torch.zeros(30, 4),
             "model.layers.0.self_attn.q_proj.weight": torch.zeros(30, 4), "model.norm.weight": torch.zeros(30),
             "model.layers.0.mlp.output.weight": torch.zeros(29, 4)}
    d = tmp_path / "m"
    d.mkdir()
    save_file(state, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"vocab_size": 30}))
    with open_checkpoint(d) as c:
        assert vocabulary_tensors(c) == {"model.embed_tokens.weight", "lm_head.weight"}
        assert vocabulary_tensors(c, [r"q_proj"]) == {"model.embed_tokens.weight", "lm_head.weight",
                                                       "model.layers.0.self_attn.q_proj.weight"}
    (d / "config.json").unlink()  # no config: no vocabulary is known
    with open_checkpoint(d) as c:
        assert vocabulary_tensors(c) == set()


def test_weights_summing_to_zero_are_a_config_error(make_family, tmp_path):
    base_path, paths, *_ = make_family(3)
    models = [ModelInput(str(p), w) for p, w in zip(paths, [1.0, -1.0, 0.0], strict=True)]
    with pytest.raises(ConfigError, match=r"weights \(1, -1, 0\) sum to zero, but average divides by their sum"):
        merge_checkpoints(base_path, models, "average", tmp_path / "out")
    assert _no_output(tmp_path)
    merge_checkpoints(base_path, models, "task_arithmetic", tmp_path / "out")  # a sum of task vectors: defined


def test_pickle_is_refused_unless_allowed_then_loaded_weights_only(make_family, tmp_path):
    base_path, _paths, _base, models = make_family(1)
    pt = tmp_path / "model.bin"
    torch.save(models[0], pt)
    with pytest.raises(CheckpointError, match=r"model\.bin is a pickle-based file.*allow_pickle"):
        merge_checkpoints(base_path, [str(pt)], "task_arithmetic", tmp_path / "out")
    merge_checkpoints(base_path, [str(pt)], "task_arithmetic", tmp_path / "out", options={"allow_pickle": True})
    assert torch.equal(_read_dir(tmp_path / "out")["layer.0.linear.weight"], models[0]["layer.0.linear.weight"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only=True"):
        open_checkpoint(evil, allow_pickle=True)


def _peft_dir(path, base, r=2, alpha=8, rslora=False, targets=("layer.0.linear", "layer.1.linear")):
    g = torch.Generator().manual_seed(7)
    path.mkdir()
    tensors, want = {}, {}
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    for t in targets:
        w = base[f"{t}.weight"]
        a, b = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)
        tensors[f"base_model.model.{t}.lora_A.weight"] = a
        tensors[f"base_model.model.{t}.lora_B.weight"] = b
        want[f"{t}.weight"] = b @ a * scale
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "use_rslora": rslora, "target_modules": list(targets)}))
    return path, want


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_task_vector_is_b_a_scale(make_family, tmp_path, rslora):
    base_path, paths, base, models = make_family(1)
    adapter, want = _peft_dir(tmp_path / "adapter", base, r=2, alpha=8, rslora=rslora)
    lora = open_checkpoint(adapter, base_names=list(base))
    for name, delta in want.items():
        assert torch.allclose(lora.delta(name), delta, atol=1e-6)
    assert lora.delta("embed.weight") is None
    merge_checkpoints(base_path, [str(adapter)], "task_arithmetic", tmp_path / "out")
    got = _read_dir(tmp_path / "out")
    for name in base:
        expect = base[name] + want[name] if name in want else base[name]
        assert torch.allclose(got[name], expect, atol=1e-6), name
    # a LoRA adapter merges with full models like any task vector
    merge_checkpoints(base_path, [str(adapter), str(paths[0])], "ties", tmp_path / "out2", {"density": 1.0})
    assert torch.allclose(_read_dir(tmp_path / "out2")["embed.weight"], models[0]["embed.weight"], atol=1e-6)


def test_peft_adapter_for_unknown_module_is_an_error(make_family, tmp_path):
    base_path, _paths, base, _models = make_family(1)
    adapter, _ = _peft_dir(tmp_path / "adapter", {**base, "nope.weight": torch.zeros(3, 3)}, targets=("nope",))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: adapter tensor for 'nope\.weight' "
                                              "matches no tensors"):
        merge_checkpoints(base_path, [str(adapter)], "task_arithmetic", tmp_path / "out")


def test_polytask_job_and_run_directories(make_family, tmp_path):
    base_path, _paths, _base, models = make_family(2)
    run = tmp_path / "run"
    (run / "jobs" / "stl__a").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    save_file(models[0], run / "jobs" / "stl__a" / "best.safetensors")
    with pytest.raises(CheckpointError, match=r"name the job.*stl__a"):
        open_checkpoint(run)
    assert torch.equal(open_checkpoint(run, job="stl/a").load("embed.weight"), models[0]["embed.weight"])
    job_dir = run / "jobs" / "stl__a"
    merge_checkpoints(base_path, [ModelInput(str(run), job="stl/a"), str(job_dir)], "average", tmp_path / "out")
    assert torch.allclose(_read_dir(tmp_path / "out")["embed.weight"], models[0]["embed.weight"])


def test_include_and_exclude_copy_tensors_from_the_base(make_family, tmp_path):
    base_path, paths, base, models = make_family(1)
    merge_checkpoints(base_path, [str(paths[0])], "task_arithmetic", tmp_path / "out",
                      options={"exclude": [r"^embed\."]})
    got = _read_dir(tmp_path / "out")
    assert torch.equal(got["embed.weight"], base["embed.weight"])
    assert torch.equal(got["layer.0.linear.weight"], models[0]["layer.0.linear.weight"])


def test_output_dtype_and_parse_size(make_family, tmp_path):
    base_path, paths, _base, _models = make_family(1)
    merge_checkpoints(base_path, [str(paths[0])], "task_arithmetic", tmp_path / "out", out_dtype="bfloat16")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got["embed.weight"].dtype == torch.bfloat16 and got["position_ids"].dtype == torch.int64
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(7) == 7
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_data_driven_method_on_checkpoints_is_a_clear_error(make_family, tmp_path):
    base_path, paths, *_ = make_family(1)
    with pytest.raises(ConfigError, match="data-driven"):
        merge_checkpoints(base_path, [str(paths[0])], "fisher", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'density' cannot be set per model"):
        merge_checkpoints(base_path, [ModelInput(str(paths[0]), params={"density": 0.5})], "task_arithmetic",
                          tmp_path / "out")


def test_model_scope_trim_reads_the_inputs_three_times_and_matches_the_in_memory_merge(make_family, tmp_path):
    base_path, paths, base, models = make_family(3, "sharded")
    params = {"density": 0.3, "trim_scope": "model"}
    summary = merge_checkpoints(base_path, [str(p) for p in paths], "ties", tmp_path / "out", params,
                                options={"fsync": False, "prefetch": 64})
    assert summary["passes"] == 3  # two statistics passes (top bits, then low bits of the magnitudes), one merge
    got, want = _read_dir(tmp_path / "out"), _expected("ties", base, models, params)
    assert all(torch.equal(got[n], want[n]) for n in want)


_HOLD_A_PARTIAL = """
import sys, torch
from polytask.merging.writer import ShardedWriter
w = ShardedWriter(sys.argv[1], [("a", torch.float32, (1000,)), ("b", torch.float32, (10,))], 10**9)
w.write("a", torch.ones(1000))
print(w.tmp, flush=True)
sys.stdin.read()
"""


def _writer_process(out):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_PARTIAL, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    partial = Path(proc.stdout.readline().strip())  # the writer has its partial directory, locked
    assert partial.is_dir() and (partial / "model.safetensors").stat().st_size > 4000
    return proc, partial


def test_a_killed_merge_leaves_a_partial_that_the_next_one_removes(make_family, tmp_path):
    base_path, paths, *_ = make_family(1)
    out = tmp_path / "out"
    live, live_partial = _writer_process(out)
    killed, partial = _writer_process(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert partial.is_dir()  # SIGKILL: nothing could clean up
    try:
        logs = []
        merge_checkpoints(base_path, [str(paths[0])], "task_arithmetic", out, log=logs.append)
        assert not partial.exists() and any(str(partial) in line for line in logs)
        assert live_partial.is_dir()  # a live writer's partial is never touched
    finally:
        live.kill()
        live.wait()
    assert remove_stale_partials(out) == [live_partial] and not live_partial.exists()


def test_a_full_disk_names_the_file_and_leaves_nothing(make_family, tmp_path, monkeypatch):
    base_path, paths, *_ = make_family(2, "hf")
    from polytask.merging import writer as writer_module

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # space is reserved up front: a full disk fails before any merging
        m.setattr(writer_module.os, "posix_fallocate", full)
        with pytest.raises(StorageError, match=r"cannot write .*out/model\.safetensors: No space left on device "
                                               r"\[errno 28\].*run the merge again") as e:
            merge_checkpoints(base_path, [str(p) for p in paths], "ties", tmp_path / "out")
        assert e.value.errno == errno.ENOSPC
    assert _no_output(tmp_path)
    calls = []

    def fills_up(fd, data, offset):  # a file system without reservations fills up during the merge
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module, "write_all", lambda fd, data, offset: fills_up(fd, data, offset))
    with pytest.raises(StorageError, match=r"cannot write .*out/model-0000\d-of-00002\.safetensors: No space"):
        merge_checkpoints(base_path, [str(p) for p in paths], "ties", tmp_path / "out", shard_size=400)
    assert _no_output(tmp_path)


# every data-free method, with parameters under which it sparsifies, and whether it takes per-model weights
DATA_FREE = {"average": {}, "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.4},
             "dare": {"drop_rate": 0.3}, "dare_ties": {"drop_rate": 0.3, "density": 0.6},
             "breadcrumbs": {"density": 0.6, "gamma": 0.05},
             "generalized": {"sparsify": ["random", "magnitude"], "drop_rate": 0.2, "density": 0.7,
                             "consensus": True, "normalize": True},
             "metagpt": {}, "lwptv": {"threshold": 0.5, "base_method": "ties", "base_params": {"density": 0.5}}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_merge_as_if_converted_to_float32_first(tmp_path, write_state, monkeypatch, dtype):
    """The streaming merge reads the models as stored and widens them inside the kernels (no float32 copy of
    any model): bit for bit the in-memory merge of float32 conversions, for every data-free method, in blocks
    split between threads."""
    from polytask.merging import METHODS, ops

    assert set(DATA_FREE) == {n for n in METHODS.names() if METHODS.get(n).extra.get("kind") == "data-free"}
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (40, 30), "layer.0.linear.weight": (30, 30), "layer.0.linear.bias": (30,)}
    base = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in shapes.items()}
    models = [{n: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(dtype) for n, t in base.items()}
              for _ in range(3)]
    base_path = write_state(tmp_path / "base", base)
    paths = [write_state(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    monkeypatch.setattr(ops, "BLOCK", 128)
    monkeypatch.setattr(ops, "PARALLEL_MIN", 256)
    as_f32 = ({n: t.float() for n, t in base.items()}, [{n: t.float() for n, t in m.items()} for m in models])
    for method, params in DATA_FREE.items():
        weights = [1.0, 0.5, 2.0] if METHODS.get(method).extra.get("uses_weights", True) else [1.0] * 3
        out = tmp_path / f"out-{method}"
        merge_checkpoints(base_path, [ModelInput(str(p), w) for p, w in zip(paths, weights, strict=True)], method,
                          out, params, out_dtype="float32", options={"fsync": False, "threads": 3})
        want = merge_state_dicts(method, *as_f32, params, weights)
        got = _read_dir(out)
        assert all(torch.equal(got[n], want[n]) for n in shapes), method


def test_a_merge_runs_torch_kernels_on_one_thread_each_and_restores_the_setting(make_family, tmp_path, monkeypatch):
    """The merge parallelises on its own threads; a kernel that started an OpenMP team on the same cores would
    wait for them. torch's thread count is back to what it was afterwards."""
    from polytask.merging import ops

    base_path, paths, *_ = make_family(3, "hf")
    seen = []
    combine = ops._combine_block

    def recording(*args):
        seen.append(torch.get_num_threads())
        return combine(*args)

    monkeypatch.setattr(ops, "_combine_block", recording)
    monkeypatch.setattr(ops, "PARALLEL_MIN", 16)
    monkeypatch.setattr(ops, "BLOCK", 16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge_checkpoints(base_path, [str(p) for p in paths], "ties", tmp_path / "out", {"density": 0.5},
                          options={"threads": 3, "fsync": False})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


@pytest.mark.parametrize("fsync", [True, False])
def test_the_writer_flushes_shards_as_it_writes_only_with_fsync(make_family, tmp_path, monkeypatch, fsync):
    from polytask.merging import writer as writer_module

    base_path, paths, *_ = make_family(2, "hf")
    flushed = []
    monkeypatch.setattr(writer_module, "SYNC_EVERY", 100)
    monkeypatch.setattr(writer_module.os, "fdatasync", lambda fd: flushed.append(fd))
    merge_checkpoints(base_path, [str(p) for p in paths], "ties", tmp_path / "out", options={"fsync": fsync})
    assert bool(flushed) == fsync


@pytest.mark.parametrize("method", ["ties", "dare_ties", "average"])
def test_mapped_tensors_merge_as_read_ones_and_never_change_the_inputs(make_family, tmp_path, monkeypatch, method):
    """Every tensor mapped (``MAP_MIN`` 1): the merge equals the in-memory one, the inputs' bytes are unchanged
    (the maps are private: ``average`` writes its result into the base's buffer, here the float32 base's map),
    and a mapped tensor is writable, copy on write."""
    from polytask.merging import tensorfile
    from polytask.merging.stream import BufferPool

    monkeypatch.setattr(tensorfile, "MAP_MIN", 1)
    base_path, paths, base, models = make_family(3, "hf")
    before = {p: p.read_bytes() for p in [base_path / "model.safetensors", *(p / "model.safetensors" for p in paths)]}
    params = {"ties": {"density": 0.5}, "dare_ties": {"drop_rate": 0.5, "density": 0.7}, "average": {}}[method]
    merge_checkpoints(base_path, [str(p) for p in paths], method, tmp_path / "out", params, options={"fsync": False})
    got, want = _read_dir(tmp_path / "out"), _expected(method, base, models, params)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert {p: p.read_bytes() for p in before} == before
    with open_checkpoint(paths[0]) as c:
        t = c.load("embed.weight")
        assert not t.untyped_storage().resizable()  # a map, not a buffer torch allocated
        assert torch.equal(t, models[0]["embed.weight"])
        t.fill_(7.0)
        assert torch.equal(c.load("embed.weight"), models[0]["embed.weight"])
        pool = BufferPool(1 << 20)
        pool.put(t)
        assert pool.held == 0  # a map is never handed out as a buffer to write into
    assert {p: p.read_bytes() for p in before} == before


def test_a_file_truncated_after_opening_is_a_clear_error_when_mapped(make_family, tmp_path, monkeypatch):
    from polytask.merging import tensorfile

    monkeypatch.setattr(tensorfile, "MAP_MIN", 1)
    _, paths, *_ = make_family(1)
    with open_checkpoint(paths[0]) as c:
        last = max(c.names(), key=lambda n: c.info(n).end)
        with open(paths[0], "r+b") as f:
            f.truncate(c.info(last).end - 4)
        with pytest.raises(CheckpointError, match=rf"m0\.safetensors: truncated file while reading tensor '{last}'"):
            c.load(last)
