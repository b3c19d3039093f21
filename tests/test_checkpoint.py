"""ggtrain.train.checkpoint: exact round trip (LoRA, AdamW state, step, data position, RNG), refusal of
truncated / corrupt / foreign files and of another base model, and a failed save that leaves the
previous checkpoint intact."""

import errno
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
from ggtrain.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from ggtrain.train.optim import AdamW


def write_base(path, seed=0, d=64, q8=False):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("base")
    for il in range(2):
        for t in ("attn_q", "attn_v"):
            a = rng.standard_normal((d, d)).astype(np.float32)
            if q8:
                w.add_tensor(f"blk.{il}.{t}.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(f"blk.{il}.{t}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ModelFile(path)


def training_state(base, steps=3, seed=0):
    cfg = LoraConfig.make(r=4, alpha=8, dropout=0.1, targets=["attn_q", "attn_v"])
    lw = LoraWeights.init(cfg, target_shapes(base.tensors, cfg, 2), seed=seed)
    opt = AdamW({"lora": lw.flat}, lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.step({"lora": rng.standard_normal(lw.flat.shape).astype(np.float32)})
    return lw, opt, rng


def make_checkpoint(base, lw, opt, rng, step=3):
    return Checkpoint(lora=lw, optimizer=opt.state_dict(), step=step, epoch=1,
                      data_position={"epoch": 1, "cursor": 17, "order_seed": 5, "nested": [1, 2, {"a": None}]},
                      config={"lr": 1e-2, "ctx": 128, "model": "base.gguf"},
                      base_fingerprint=model_fingerprint(base), base_name=base.path.name,
                      extra={"losses": [3.5, 3.25]})


def test_round_trip_exact_and_resume_continues_identically(tmp_path):
    base = write_base(tmp_path / "base.gguf")
    lw, opt, rng = training_state(base)
    ck = make_checkpoint(base, lw, opt, rng)
    p = save_checkpoint(tmp_path / "ck.npz", ck)
    back = load_checkpoint(p, base)
    np.testing.assert_array_equal(back.lora.flat, lw.flat)
    assert back.lora.layout == lw.layout
    assert back.step == 3 and back.epoch == 1
    assert back.data_position == ck.data_position and back.config == ck.config and back.extra == ck.extra
    assert back.base_name == "base.gguf"
    assert back.optimizer["t"] == 3 and back.optimizer["weight_decay"] == 0.1
    np.testing.assert_array_equal(back.optimizer["m"]["lora"], opt.m["lora"])
    np.testing.assert_array_equal(back.optimizer["v"]["lora"], opt.v["lora"])

    # continuing from the checkpoint gives bit-identical parameters
    opt2 = AdamW({"lora": back.lora.flat})
    opt2.load_state_dict(back.optimizer)
    for _ in range(4):
        g = rng.standard_normal(lw.flat.shape).astype(np.float32)
        opt.step({"lora": g})
        opt2.step({"lora": g})
    np.testing.assert_array_equal(back.lora.flat, lw.flat)


def test_refuses_other_base_model(tmp_path):
    base = write_base(tmp_path / "base.gguf")
    lw, opt, rng = training_state(base)
    p = save_checkpoint(tmp_path / "ck.npz", make_checkpoint(base, lw, opt, rng))
    other_weights = write_base(tmp_path / "other.gguf", seed=1)  # same shapes, other weights
    other_quant = write_base(tmp_path / "q8.gguf", q8=True)  # same model, other quantization
    assert len({model_fingerprint(m) for m in (base, other_weights, other_quant)}) == 3
    assert model_fingerprint(write_base(tmp_path / "again.gguf")) == model_fingerprint(base)
    for other in (other_weights, other_quant):
        with pytest.raises(GGTrainError) as ei:
            load_checkpoint(p, other)
        msg = str(ei.value)
        assert str(p) in msg and "base model 'base.gguf'" in msg and str(other.path) in msg
    assert load_checkpoint(p, fingerprint=model_fingerprint(base)).step == 3
    assert load_checkpoint(p).step == 3  # no base given: no check


def test_truncated_corrupt_and_foreign_files(tmp_path):
    base = write_base(tmp_path / "base.gguf")
    lw, opt, rng = training_state(base)
    p = save_checkpoint(tmp_path / "ck.npz", make_checkpoint(base, lw, opt, rng))
    data = p.read_bytes()

    for n in (len(data) // 2, len(data) - 10, 30):
        cut = tmp_path / f"cut{n}.npz"
        cut.write_bytes(data[:n])
        with pytest.raises(GGTrainError, match=rf"cut{n}\.npz: (corrupt or truncated|not a ggtrain) checkpoint"):
            load_checkpoint(cut, base)

    # one flipped byte inside the LoRA data: the zip CRC or our sha256 catches it
    flipped = bytearray(data)
    i = data.find(lw.flat[5:9].tobytes())
    assert i > 0
    flipped[i] ^= 0xFF
    bad = tmp_path / "flip.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(GGTrainError, match=r"flip\.npz: corrupt"):
        load_checkpoint(bad, base)

    other_npz = tmp_path / "other.npz"
    np.savez(other_npz, x=np.zeros(3))
    with pytest.raises(GGTrainError, match=r"other\.npz: not a ggtrain checkpoint"):
        load_checkpoint(other_npz)
    with pytest.raises(GGTrainError, match=r"base\.gguf: not a ggtrain checkpoint"):
        load_checkpoint(base.path)
    with pytest.raises(GGTrainError, match=r"nope\.npz: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(GGTrainError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    base = write_base(tmp_path / "base.gguf")
    lw, opt, rng = training_state(base)
    p = save_checkpoint(tmp_path / "ck.npz", make_checkpoint(base, lw, opt, rng, step=3))
    before = p.read_bytes()

    real_savez = np.savez

    def savez_then_enospc(f, **arrays):
        real_savez(f, **arrays)  # a partial file exists by now
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_enospc)
    lw.flat[:] += 1.0
    with pytest.raises(GGTrainError, match=r"ck\.npz: could not write: no space left on device.*intact"):
        save_checkpoint(p, make_checkpoint(base, lw, opt, rng, step=4))
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert load_checkpoint(p, base).step == 3
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")] == []


def test_real_write_failure_in_subprocess(tmp_path):
    """The kernel refusing the write (RLIMIT_FSIZE) mid-checkpoint: previous checkpoint intact."""
    base = write_base(tmp_path / "base.gguf")
    lw, opt, rng = training_state(base)
    p = save_checkpoint(tmp_path / "ck.npz", make_checkpoint(base, lw, opt, rng, step=3))
    before = p.read_bytes()
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from ggtrain.train.checkpoint import Checkpoint, save_checkpoint
        from ggtrain.errors import GGTrainError
        from ggtrain.model.lora import LoraWeights
        lw = LoraWeights({{"blk.0.attn_q.weight": (4096, 4096, 64, 64.0, 0.0)}})  # 2 MiB of LoRA
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 1000}, {len(before) + 1000}))
        try:
            save_checkpoint({str(p)!r}, Checkpoint(lora=lw, optimizer={{}}, step=9, epoch=0))
        except GGTrainError as e:
            print(e)
            sys.exit(2)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(p) in r.stdout and "could not write" in r.stdout
    assert p.read_bytes() == before
    assert load_checkpoint(p, base).step == 3

