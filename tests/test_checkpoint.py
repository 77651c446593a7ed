"""rwkv7/checkpoint.py on its own: weights files (save, read, load, key checks), full-checkpoint folders (begin,
commit and rotation, listing, size estimate, meta validation, plain state) and the messages of every failure."""
import errno
import json

import pytest
import torch

from rwkv7 import checkpoint as ckpt
from rwkv7 import fsutil
from rwkv7.errors import UserError
from rwkv7.model import RWKV7, ModelShape

SHAPE = ModelShape(n_layer=1, n_embd=64, vocab_size=97, head_size=64)
NOT_RWKV7 = "is not an RWKV-7 checkpoint (no emb.weight / blocks.0.att.r_k)"
RECIPE_HINT = ": check the recipe's [model] section"


def small_model(seed=0) -> RWKV7:
    torch.manual_seed(seed)
    model = RWKV7(SHAPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def message(excinfo) -> str:
    return str(excinfo.value)


RAN = []  # what pickled code ran on load: must stay empty


def _ran(what):
    RAN.append(what)
    return torch.zeros(1)


class RunsCodeOnLoad:
    def __reduce__(self):
        return _ran, ("pickle code",)


def save_as_if_from_gpu(obj, path, monkeypatch):
    """torch.save, with every storage tagged as living on cuda:0 (what a GPU run writes)."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "_package_registry",
                  [(0, lambda storage: "cuda:0", None)] + list(torch.serialization._package_registry))
        torch.save(obj, path)


class GpuTensor:
    """Stands for a tensor on an accelerator: it reaches the CPU only when moved there ("meta" plays the GPU)."""

    def __init__(self, t):
        self.t = t

    def detach(self):
        return self

    def to(self, *args):
        device = next((a for a in args if isinstance(a, (str, torch.device))), None)
        dtype = next((a for a in args if isinstance(a, torch.dtype)), None)
        on = "cpu" if device is not None and torch.device(device).type == "cpu" else "meta"
        return self.t.to(on, dtype)


# ---- save / read / load weights ------------------------------------------------------------------------------------

def test_saved_weights_are_bf16_by_default_and_load_back_in_the_files_dtype(tmp_path):
    model = small_model()
    path = tmp_path / "rwkv-1.pth"
    ckpt.save_weights(model, path)
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(model.state_dict())
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in sd.values())

    loaded = ckpt.load_weights(path)
    assert isinstance(loaded, RWKV7) and not loaded.training
    assert loaded.shape == SHAPE
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, sd[k]), k
        assert torch.equal(v, model.state_dict()[k].to(torch.bfloat16)), k


def test_load_weights_keeps_fp32_files_fp32_and_honours_dtype_and_device(tmp_path):
    model = small_model(1)
    path = tmp_path / "rwkv-2.pth"
    ckpt.save_weights(model, path, dtype=torch.float32)
    loaded = ckpt.load_weights(path)
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, model.state_dict()[k]), k

    as64 = ckpt.load_weights(path, dtype=torch.float64)
    assert all(v.dtype == torch.float64 for v in as64.state_dict().values())
    assert torch.equal(as64.emb.weight, model.emb.weight.double())
    assert not as64.training

    on_meta = ckpt.load_weights(path, device="meta")
    assert all(v.device.type == "meta" and v.dtype == torch.float32 for v in on_meta.state_dict().values())
    assert not on_meta.training


def test_save_state_dict_converts_and_moves_every_tensor(tmp_path):
    sd = {"a": torch.ones(3, dtype=torch.float64, requires_grad=True), "b": torch.arange(4.0)}
    path = tmp_path / "w.pth"
    ckpt.save_state_dict(sd, path, torch.float16)
    back = torch.load(path, weights_only=True)
    assert set(back) == {"a", "b"}
    assert back["a"].dtype == torch.float16 and torch.equal(back["a"], torch.ones(3, dtype=torch.float16))
    assert torch.equal(back["b"], torch.arange(4.0).half())
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_weights_of_a_gpu_model_are_written_as_cpu_tensors(tmp_path):
    path = tmp_path / "gpu.pth"
    ckpt.save_state_dict({"w": GpuTensor(torch.arange(6.0).reshape(2, 3))}, path)
    back = torch.load(path, weights_only=True)
    assert back["w"].device.type == "cpu" and back["w"].dtype == torch.bfloat16
    assert torch.equal(back["w"], torch.arange(6.0).reshape(2, 3).bfloat16())


def test_failed_weights_write_is_a_user_error_naming_file_folder_and_need(tmp_path, monkeypatch):
    def full(folder, need):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "ensure_space", full)
    monkeypatch.setattr(fsutil, "_free_or_none", lambda folder: 2 ** 20)
    sd = {"a": torch.zeros(2 ** 19), "b": torch.zeros(2 ** 19)}  # 2 MiB in bf16
    with pytest.raises(UserError) as e:
        ckpt.save_state_dict(sd, tmp_path / "rwkv-3.pth")
    assert message(e) == (f"could not write rwkv-3.pth in {tmp_path} (No space left on device; about 2.0 MiB needed, "
                          f"1.0 MiB free): free disk space there or choose another folder")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def test_failed_weights_write_checks_the_space_the_file_needs(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ckpt, "ensure_space", lambda folder, need: seen.append((folder, need)))
    ckpt.save_state_dict({"a": torch.zeros(10), "b": torch.zeros(3, 2)}, tmp_path / "x.pth", torch.float32)
    assert seen == [(tmp_path, 16 * 4)]


def test_other_errors_while_saving_are_not_hidden(tmp_path, monkeypatch):
    def boom(folder, need):
        raise ValueError("a bug")

    monkeypatch.setattr(ckpt, "ensure_space", boom)
    with pytest.raises(ValueError, match="^a bug$"):
        ckpt.save_state_dict({"a": torch.zeros(2)}, tmp_path / "x.pth")


def test_read_state_dict_of_a_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(UserError) as e:
        ckpt.read_state_dict(path)
    assert message(e) == f"checkpoint {path} not found: give the path of an rwkv-*.pth file"
    with pytest.raises(UserError) as e:  # a folder is not a weights file
        ckpt.read_state_dict(tmp_path)
    assert message(e) == f"checkpoint {tmp_path} not found: give the path of an rwkv-*.pth file"


def test_read_state_dict_of_an_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.pth"
    torch.save({"x": torch.zeros(1)}, path)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt, "open", denied, raising=False)  # tests run as root: chmod would not stop the read
    with pytest.raises(UserError) as e:
        ckpt.read_state_dict(str(path))
    assert message(e) == f"cannot read {path} (Permission denied): make it readable (chmod +r)"
    assert e.value.__cause__ is None and e.value.__suppress_context__

    def odd(*a, **k):
        raise OSError("odd failure")

    monkeypatch.setattr(ckpt, "open", odd, raising=False)
    with pytest.raises(UserError) as e:
        ckpt.read_state_dict(path)
    assert message(e) == f"cannot read {path} (odd failure): make it readable (chmod +r)"


def test_read_state_dict_of_a_file_that_is_not_torch(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"definitely not a zip or a pickle")
    with pytest.raises(Exception) as raw:
        torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(UserError) as e:
        ckpt.read_state_dict(path)
    assert message(e) == (f"{path} is not a readable PyTorch weights file ({type(raw.value).__name__}): "
                          "was it truncated, or written by something else?")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_weights_written_on_a_gpu_load_on_the_cpu(tmp_path, monkeypatch):
    model = small_model(5)
    path = tmp_path / "from-gpu.pth"
    save_as_if_from_gpu(model.state_dict(), path, monkeypatch)
    sd = ckpt.read_state_dict(path)
    assert all(v.device.type == "cpu" for v in sd.values())
    loaded = ckpt.load_weights(path)
    assert torch.equal(loaded.emb.weight, model.emb.weight)


@pytest.mark.parametrize("force_pickles", ["", "1"])
def test_no_pickle_code_runs_when_reading_weights(tmp_path, monkeypatch, force_pickles):
    if force_pickles:  # asks torch.load to run pickles unless weights_only=True is passed
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force_pickles)
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": RunsCodeOnLoad()}, path)
    RAN.clear()
    with pytest.raises(UserError) as e:
        ckpt.read_state_dict(path)
    assert RAN == []
    assert message(e) == (f"{path} is not a readable PyTorch weights file (UnpicklingError): "
                          "was it truncated, or written by something else?")


@pytest.mark.parametrize("content", [[torch.zeros(1)], {"a": torch.zeros(1), "b": 3}, torch.zeros(2)])
def test_read_state_dict_wants_a_flat_dict_of_tensors(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(UserError) as e:
        ckpt.read_state_dict(path)
    assert message(e) == f"{path} does not hold a flat state dict of tensors (an official-format rwkv-*.pth)"


def test_read_state_dict_strips_wrapper_prefixes(tmp_path):
    a, b = torch.arange(3.0), torch.ones(2)
    cases = [
        ({"module.x.w": a, "module.y": b}, {"x.w": a, "y": b}),
        ({"model.x.w": a, "model.y": b}, {"x.w": a, "y": b}),
        ({"_forward_module.x.w": a, "_forward_module.y": b}, {"x.w": a, "y": b}),
        ({"_forward_module.module.x.w": a, "_forward_module.module.y": b}, {"x.w": a, "y": b}),
        ({"module.x.w": a, "y": b}, {"module.x.w": a, "y": b}),  # not all prefixed: kept as is
        ({"x.module.w": a}, {"x.module.w": a}),
        ({}, {}),
    ]
    for i, (saved, want) in enumerate(cases):
        path = tmp_path / f"{i}.pth"
        torch.save(saved, path)
        got = ckpt.read_state_dict(path)
        assert list(got) == list(want), saved
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_load_weights_strips_prefixes_of_a_wrapped_model(tmp_path):
    model = small_model(2)
    path = tmp_path / "wrapped.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    loaded = ckpt.load_weights(path)
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_load_weights_of_something_else(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError) as e:
        ckpt.load_weights(path)
    assert message(e) == f"{path} {NOT_RWKV7}"
    assert e.value.__cause__ is None and e.value.__suppress_context__

    torch.save({"emb.weight": torch.zeros(97, 64)}, path)  # no blocks.0.att.r_k
    with pytest.raises(UserError) as e:
        ckpt.load_weights(str(path))
    assert message(e) == f"{path} {NOT_RWKV7}"

    torch.save({"emb.weight": torch.zeros(97), "blocks.0.att.r_k": torch.zeros(1, 64)}, path)  # 1-D: ValueError
    with pytest.raises(UserError) as e:
        ckpt.load_weights(path)
    assert message(e) == f"{path} {NOT_RWKV7}"


def test_load_weights_names_the_file_when_keys_do_not_match(tmp_path):
    sd = small_model().state_dict()
    sd["extra.thing"] = torch.zeros(1)
    path = tmp_path / "plus.pth"
    torch.save(sd, path)
    with pytest.raises(UserError) as e:
        ckpt.load_weights(path)
    assert message(e) == f"{path} does not match this model (unexpected: extra.thing){RECIPE_HINT}"


# ---- load_into: the key check -------------------------------------------------------------------------------------

def test_load_into_copies_every_tensor_in_the_models_dtype():
    src, dst = small_model(3), small_model(4)
    sd = {k: v.double() for k, v in src.state_dict().items()}
    ckpt.load_into(dst, sd, "here")
    for k, v in dst.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, src.state_dict()[k]), k


def test_load_into_names_up_to_three_missing_keys():
    model = small_model()
    own = list(model.state_dict())
    sd = dict(model.state_dict())
    for k in own[:3]:
        del sd[k]
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, sd, "three.pth")
    assert message(e) == f"three.pth does not match this model (missing: {', '.join(own[:3])}){RECIPE_HINT}"

    del sd[own[3]]
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, sd, "four.pth")
    assert message(e) == f"four.pth does not match this model (missing: {', '.join(own[:3])} ...){RECIPE_HINT}"

    only = {own[1]: model.state_dict()[own[1]]}
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, only, "one.pth")
    rest = [k for k in own if k != own[1]]
    assert message(e) == (f"one.pth does not match this model (missing: {', '.join(rest[:3])} ...){RECIPE_HINT}")


def test_load_into_names_unexpected_keys():
    model = small_model()
    sd = dict(model.state_dict())
    sd.update({f"x{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, sd, "more.pth")
    assert message(e) == f"more.pth does not match this model (unexpected: x0, x1, x2 ...){RECIPE_HINT}"


def test_load_into_names_keys_whose_shape_differs():
    model = small_model()
    sd = dict(model.state_dict())
    sd["emb.weight"] = torch.zeros(98, 64)
    sd["head.weight"] = torch.zeros(98, 64)
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, sd, "wide.pth")
    assert message(e) == f"wide.pth does not match this model (shape differs: emb.weight, head.weight){RECIPE_HINT}"


def test_load_into_lists_all_three_kinds_of_mismatch_and_changes_nothing():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    del sd["ln_out.bias"]
    sd["bonus"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(1, 64)
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, sd, "mixed.pth")
    assert message(e) == ("mixed.pth does not match this model (missing: ln_out.bias; unexpected: bonus; "
                          f"shape differs: head.weight){RECIPE_HINT}")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- full checkpoints: folders ------------------------------------------------------------------------------------

def make_ckpt(run_dir, name, files=None):
    d = run_dir / "ckpt" / name
    d.mkdir(parents=True)
    (d / "meta.json").write_text("{}")
    for rel, data in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def test_checkpoint_dirs_lists_complete_step_folders_oldest_first(tmp_path):
    assert ckpt.checkpoint_dirs(tmp_path) == []
    (tmp_path / "ckpt").mkdir()
    assert ckpt.checkpoint_dirs(tmp_path) == []
    b = make_ckpt(tmp_path, "step-00000020")
    a = make_ckpt(tmp_path, "step-00000010")
    (tmp_path / "ckpt" / "step-00000030").mkdir()  # no meta.json: half written
    make_ckpt(tmp_path, ".tmp-step-00000040")
    make_ckpt(tmp_path, "other")
    (tmp_path / "ckpt" / "step-00000050").write_text("a file")
    weird = tmp_path / "ckpt" / "step-00000060"
    (weird / "meta.json").mkdir(parents=True)  # meta.json must be a file
    assert ckpt.checkpoint_dirs(tmp_path) == [a, b]


def test_checkpoint_dirs_when_ckpt_is_a_file(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    assert ckpt.checkpoint_dirs(tmp_path) == []


def test_begin_checkpoint_gives_a_fresh_empty_temp_folder(tmp_path):
    tmp = ckpt.begin_checkpoint(tmp_path, 12)
    assert tmp == tmp_path / "ckpt" / ".tmp-step-00000012"
    assert tmp.is_dir() and list(tmp.iterdir()) == []
    (tmp / "leftover").write_text("from a killed run")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "f").write_text("x")
    again = ckpt.begin_checkpoint(tmp_path, 12)
    assert again == tmp and again.is_dir() and list(again.iterdir()) == []


def test_commit_checkpoint_renames_writes_meta_and_keeps_the_newest(tmp_path):
    made = []
    for step in (1, 2, 3, 4):
        tmp = ckpt.begin_checkpoint(tmp_path, step)
        (tmp / "state.pt").write_bytes(b"x" * step)
        meta = {"state": {"step": step}, "fingerprint": "f"}
        final = ckpt.commit_checkpoint(tmp, meta, keep=2)
        assert final == tmp_path / "ckpt" / f"step-{step:08d}"
        assert not tmp.exists()
        assert json.loads((final / "meta.json").read_text()) == meta
        assert (final / "state.pt").read_bytes() == b"x" * step
        made.append(final)
        assert ckpt.checkpoint_dirs(tmp_path) == made[-2:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000003", "step-00000004"]

    tmp = ckpt.begin_checkpoint(tmp_path, 5)
    ckpt.commit_checkpoint(tmp, {"n": 5}, keep=1)
    assert ckpt.checkpoint_dirs(tmp_path) == [tmp_path / "ckpt" / "step-00000005"]


def test_commit_checkpoint_replaces_an_existing_folder_of_the_same_step(tmp_path):
    old = make_ckpt(tmp_path, "step-00000007", {"stale.pt": b"old"})
    tmp = ckpt.begin_checkpoint(tmp_path, 7)
    (tmp / "state.pt").write_bytes(b"new")
    final = ckpt.commit_checkpoint(tmp, {"step": 7}, keep=3)
    assert final == old
    assert sorted(p.name for p in final.iterdir()) == ["meta.json", "state.pt"]
    assert json.loads((final / "meta.json").read_text()) == {"step": 7}


def test_commit_checkpoint_ignores_an_old_checkpoint_removed_meanwhile(tmp_path, monkeypatch):
    real = ckpt.checkpoint_dirs
    gone = tmp_path / "ckpt" / "step-00000001"  # listed, then deleted by someone else before rotation reached it
    monkeypatch.setattr(ckpt, "checkpoint_dirs", lambda run_dir: [gone] + real(run_dir))
    tmp = ckpt.begin_checkpoint(tmp_path, 2)
    final = ckpt.commit_checkpoint(tmp, {"n": 2}, keep=1)
    assert final == tmp_path / "ckpt" / "step-00000002" and (final / "meta.json").is_file()


def test_checkpoint_bytes_is_the_newest_checkpoints_size(tmp_path):
    model = small_model()
    n = sum(p.numel() for p in model.parameters())
    assert ckpt.checkpoint_bytes(tmp_path, model) == 12 * n
    make_ckpt(tmp_path, "step-00000001", {"state.pt": b"a" * 1000})
    make_ckpt(tmp_path, "step-00000002", {"state.pt": b"b" * 300, "ds/part0": b"c" * 50, "ds/deep/part1": b"d" * 7})
    assert ckpt.checkpoint_bytes(tmp_path, model) == 300 + 50 + 7 + len("{}")


def test_checkpoint_bytes_estimates_when_the_checkpoint_vanishes(tmp_path, monkeypatch):
    model = small_model()
    make_ckpt(tmp_path, "step-00000001", {"state.pt": b"a" * 1000})

    class Removed:  # a file listed, then deleted by another process before its size is read
        def is_file(self):
            return True

        def stat(self):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    class Vanishing:
        name = "step-00000001"

        def rglob(self, pattern):
            return iter([Removed()])

    monkeypatch.setattr(ckpt, "checkpoint_dirs", lambda run_dir: [Vanishing()])
    n = sum(p.numel() for p in model.parameters())
    assert ckpt.checkpoint_bytes(tmp_path, model) == 12 * n


# ---- write_error ----------------------------------------------------------------------------------------------------

def test_write_error_when_another_rank_failed(tmp_path):
    e = ckpt.write_error(tmp_path, 9, None, 123)
    assert isinstance(e, UserError)
    assert str(e) == ("could not write the checkpoint of step 9: another rank could not write its part "
                      f"(no earlier checkpoint exists); free disk space in {tmp_path} and run the same command to "
                      "resume")
    make_ckpt(tmp_path, "step-00000004")
    make_ckpt(tmp_path, "step-00000006")
    e = ckpt.write_error(tmp_path, 9, None, None)
    assert str(e) == ("could not write the checkpoint of step 9: another rank could not write its part "
                      f"(kept step-00000006); free disk space in {tmp_path} and run the same command to resume")


def test_write_error_for_a_local_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_free_or_none", lambda folder: 2 ** 30)
    full = OSError(errno.ENOSPC, "No space left on device")
    e = ckpt.write_error(tmp_path, 10, full, 3 * 2 ** 30)
    assert isinstance(e, UserError)
    assert str(e) == (f"could not write the checkpoint of step 10 in {tmp_path / 'ckpt'} (No space left on device; "
                      "about 3.0 GiB needed, 1.0 GiB free): free disk space there, then run the same command to "
                      "resume (no earlier checkpoint exists)")
    make_ckpt(tmp_path, "step-00000005")
    e = ckpt.write_error(tmp_path, 10, RuntimeError("PytorchStreamWriter failed writing file"), None)
    assert str(e) == (f"could not write the checkpoint of step 10 in {tmp_path / 'ckpt'} (the write failed; usually "
                      "the disk is full; 1.0 GiB free): free disk space there, then run the same command to resume "
                      "(kept step-00000005)")


# ---- meta.json ------------------------------------------------------------------------------------------------------

def test_read_meta_accepts_a_valid_meta(tmp_path):
    meta = {"state": {"step": 3, "records": [{"a": 1}]}, "fingerprint": "abc", "other": 1}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.read_meta(tmp_path) == meta
    meta = {"state": {"step": 0}, "fingerprint": ""}  # records may be absent
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.read_meta(tmp_path) == meta


def test_read_meta_of_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(OSError) as raw:
        (tmp_path / "meta.json").read_text()
    with pytest.raises(UserError) as e:
        ckpt.read_meta(tmp_path)
    assert message(e) == (f"checkpoint {tmp_path} is unreadable ({raw.value}): delete that folder to resume from "
                          "an older one")
    (tmp_path / "meta.json").write_text('{"state": ')
    with pytest.raises(ValueError) as raw:
        json.loads('{"state": ')
    with pytest.raises(UserError) as e:
        ckpt.read_meta(tmp_path)
    assert message(e) == (f"checkpoint {tmp_path} is unreadable ({raw.value}): delete that folder to resume from "
                          "an older one")


@pytest.mark.parametrize("meta", [
    [1, 2],
    "text",
    {"fingerprint": "f"},
    {"state": [], "fingerprint": "f"},
    {"state": {"step": 1}},
    {"state": {"step": 1}, "fingerprint": 5},
    {"state": {"step": "1"}, "fingerprint": "f"},
    {"state": {}, "fingerprint": "f"},
    {"state": {"step": 1, "records": {}}, "fingerprint": "f"},
    {"state": {"step": 1, "records": None}, "fingerprint": "f"},
])
def test_read_meta_rejects_a_meta_without_state_and_fingerprint(tmp_path, meta):
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        ckpt.read_meta(tmp_path)
    assert message(e) == (f"checkpoint {tmp_path} is unreadable (meta.json lacks a valid state and fingerprint): "
                          "delete that folder to resume from an older one")


# ---- plain (non-DeepSpeed) state -------------------------------------------------------------------------------------

class FakeOptimizer:  # what save_plain_state uses of an optimizer (a real one costs seconds of imports)
    def __init__(self):
        self.exp_avg = torch.randn(5, 3)

    def state_dict(self):
        return {"state": {0: {"step": torch.tensor(4.0), "exp_avg": self.exp_avg}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]}


def test_plain_state_round_trip(tmp_path):
    model, opt = small_model(), FakeOptimizer()
    ckpt.save_plain_state(tmp_path, model, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    state = ckpt.load_plain_state(tmp_path)
    assert set(state) == {"model", "optimizer"}
    assert list(state["model"]) == list(model.state_dict())
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    assert state["optimizer"]["param_groups"] == [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], opt.exp_avg)
    assert torch.equal(state["optimizer"]["state"][0]["step"], torch.tensor(4.0))


def test_plain_state_written_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    save_as_if_from_gpu({"model": {"w": torch.arange(4.0)}, "optimizer": {}}, tmp_path / "state.pt", monkeypatch)
    state = ckpt.load_plain_state(tmp_path)
    assert state["model"]["w"].device.type == "cpu" and torch.equal(state["model"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("force_pickles", ["", "1"])
def test_no_pickle_code_runs_when_loading_plain_state(tmp_path, monkeypatch, force_pickles):
    if force_pickles:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force_pickles)
    torch.save({"model": {}, "optimizer": RunsCodeOnLoad()}, tmp_path / "state.pt")
    RAN.clear()
    with pytest.raises(UserError) as e:
        ckpt.load_plain_state(tmp_path)
    assert RAN == []
    assert message(e) == (f"checkpoint {tmp_path}/state.pt is unreadable (UnpicklingError): delete that folder to "
                          "resume from an older one")


def test_load_plain_state_of_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(UserError) as e:
        ckpt.load_plain_state(tmp_path)
    assert message(e) == (f"checkpoint {tmp_path}/state.pt is unreadable (FileNotFoundError): delete that folder to "
                          "resume from an older one")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(Exception) as raw:
        torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    with pytest.raises(UserError) as e:
        ckpt.load_plain_state(tmp_path)
    assert message(e) == (f"checkpoint {tmp_path}/state.pt is unreadable ({type(raw.value).__name__}): delete that "
                          "folder to resume from an older one")


def test_architecture_is_read_off_the_state_dict():
    """Head size and LoRA ranks come from the tensors' shapes: a head size other than 64 and non-formula ranks
    survive a save and load."""
    from rwkv7.model import shape_from_state_dict

    shape = ModelShape(n_layer=2, n_embd=64, vocab_size=97, head_size=32, lora=(16, 16, 32, 48))
    got = shape_from_state_dict(RWKV7(shape).state_dict())
    assert got == shape
    default = ModelShape(n_layer=3, n_embd=128, vocab_size=50)
    assert shape_from_state_dict(RWKV7(default).state_dict()) == default  # formula ranks: lora None
