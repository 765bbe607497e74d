"""safetensors reading, weight-file discovery (variants, shards) and strict-load reports.

Oracle: the ``safetensors`` library (``safetensors.torch.save_file`` / ``load_file``, version in
``safetensors.__version__``) writes the files and reads them back as the reference. Seeds: torch.manual_seed(0).
"""

from __future__ import annotations

import json
import re

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from w2sd.errors import CheckpointError
from w2sd.sdxl.loading.safetensors_io import CheckpointReader, find_weight_files, read_safetensors_header
from w2sd.sdxl.loading.strict import MAX_LISTED, TensorRecipe, load_strict

SAFETENSORS_VERSION = safetensors.__version__


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(6, 4),
        "b.half": torch.randn(3, 5).half(),
        "c.bf16": torch.randn(7).bfloat16(),
        "d.ids": torch.arange(10, dtype=torch.int64)[None],
        "e.scalar": torch.tensor(4.5),
        "f.empty": torch.zeros(0, 3),
    }


def test_reader_matches_safetensors_and_converts_per_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    reader = CheckpointReader([path])
    ref = load_file(str(path))
    assert set(reader.keys()) == set(ref)
    assert reader.metadata == {"format": "pt"}
    for key, tensor in reader.read_all().items():
        assert tensor.dtype == ref[key].dtype and torch.equal(tensor, ref[key]), key
    half = reader.read("a.weight", dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, ref["a.weight"].half())
    assert reader.read("d.ids", dtype=torch.float16).dtype == torch.int64  # integer tensors keep their dtype
    assert torch.equal(reader.read("a.weight", rows=(2, 5)), ref["a.weight"][2:5])
    assert reader.nbytes(torch.float16) == sum(t.numel() * (2 if t.is_floating_point() else 8) for t in ref.values())


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-17])  # data region cut short
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        CheckpointReader([cut])
    cut.write_bytes(data[:40])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or not a safetensors file"):
        read_safetensors_header(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*at least 8"):
        read_safetensors_header(cut)
    bad = tmp_path / "bad.safetensors"
    header = b"{not json" + b" " * 7
    bad.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*corrupt safetensors header"):
        read_safetensors_header(bad)
    wrong = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(len(wrong).to_bytes(8, "little") + wrong + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*tensor 'x'.*16 bytes"):
        read_safetensors_header(bad)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_safetensors_header(tmp_path / "nope.safetensors")


def _write(folder, name, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))


def test_variant_selection(tmp_path):
    t = {"w": torch.ones(2)}
    both = tmp_path / "both"
    _write(both, "diffusion_pytorch_model.safetensors", t)
    _write(both, "diffusion_pytorch_model.fp16.safetensors", {"w": torch.ones(2).half()})
    files, note = find_weight_files(both)
    assert [f.name for f in files] == ["diffusion_pytorch_model.safetensors"]
    files, note = find_weight_files(both, variant="fp16")
    assert [f.name for f in files] == ["diffusion_pytorch_model.fp16.safetensors"]

    only = tmp_path / "only"
    _write(only, "model.fp16.safetensors", t)
    files, note = find_weight_files(only, bases=("model",))
    assert [f.name for f in files] == ["model.fp16.safetensors"] and "only variant 'fp16'" in note

    plain = tmp_path / "plain"
    _write(plain, "model.safetensors", t)
    files, note = find_weight_files(plain, bases=("model",), variant="fp16")
    assert files[0].name == "model.safetensors" and "not present" in note

    two = tmp_path / "two"
    _write(two, "model.fp16.safetensors", t)
    _write(two, "model.bf16.safetensors", t)
    with pytest.raises(CheckpointError, match=r"several weight variants \['bf16', 'fp16'\]"):
        find_weight_files(two, bases=("model",))

    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"pickled weights \['diffusion_pytorch_model.bin'\]"):
        find_weight_files(pickle)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no weights file"):
        find_weight_files(empty)


def test_sharded_index_plain_and_variant(tmp_path):
    torch.manual_seed(0)
    full = {f"layer{i}.weight": torch.randn(3, 3) for i in range(5)}
    folder = tmp_path / "unet"
    for variant, index_name in [(None, "diffusion_pytorch_model.safetensors.index.json"),
                                ("fp16", "diffusion_pytorch_model.safetensors.index.fp16.json")]:
        stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
        shards = {f"{stem}-00001-of-00002.safetensors": dict(list(full.items())[:2]),
                  f"{stem}-00002-of-00002.safetensors": dict(list(full.items())[2:])}
        weight_map = {}
        for name, part in shards.items():
            _write(folder, name, part)
            weight_map.update({k: name for k in part})
        (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        files, _ = find_weight_files(folder, variant=variant)
        assert sorted(f.name for f in files) == sorted(shards)
        reader = CheckpointReader(files)
        assert all(torch.equal(reader.read(k), v) for k, v in full.items())
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard listed in .*index.json.*00002-of-00002"):
        find_weight_files(folder)


class _Toy(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        self.register_buffer("steps", torch.arange(5), persistent=True)
        self.register_buffer("freqs", torch.linspace(0, 1, 4), persistent=False)  # computed in __init__


def test_strict_load_assigns_target_dtype_and_keeps_buffers(tmp_path):
    torch.manual_seed(0)
    ref = _Toy()
    save_file(ref.state_dict(), str(tmp_path / "toy.safetensors"))
    reader = CheckpointReader([tmp_path / "toy.safetensors"])
    recipes = {k: TensorRecipe(k) for k in reader.keys()}
    model = load_strict(_Toy, recipes, reader, dtype=torch.float16, what="toy")
    for k, v in ref.state_dict().items():
        got = model.state_dict()[k]
        assert torch.equal(got, v.half() if v.is_floating_point() else v), k
    assert model.layers[0].weight.dtype == torch.float16 and model.steps.dtype == torch.int64
    assert torch.equal(model.freqs, torch.linspace(0, 1, 4).half())  # non-persistent buffer survived
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training and not model.layers[0].weight.requires_grad


def test_strict_report_names_missing_unexpected_misshaped_and_caps(tmp_path):
    torch.manual_seed(0)
    sd = _Toy(30).state_dict()
    sd.pop("layers.0.bias")
    sd["layers.1.weight"] = torch.randn(4, 5)
    sd["extra.thing"] = torch.randn(2)
    for i in range(5, 30):  # 25 layers x 2 tensors missing -> capped listing
        sd.pop(f"layers.{i}.weight")
        sd.pop(f"layers.{i}.bias")
    save_file(sd, str(tmp_path / "toy.safetensors"))
    reader = CheckpointReader([tmp_path / "toy.safetensors"])
    with pytest.raises(CheckpointError) as info:
        load_strict(lambda: _Toy(30), {k: TensorRecipe(k) for k in reader.keys()}, reader, what="toy")
    msg = str(info.value)
    assert "toy: checkpoint" in msg and "toy.safetensors" in msg
    assert "missing keys (51):" in msg and "layers.0.bias" in msg
    assert f"... and {51 - MAX_LISTED} more" in msg
    assert "unexpected keys (1):" in msg and "extra.thing" in msg
    assert re.search(r"layers\.1\.weight: \[4, 5\] vs \[4, 4\]", msg)
