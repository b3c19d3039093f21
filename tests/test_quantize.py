"""ggtrain.kernels.quantize writes the bytes llama-quantize writes, type by type.

One F32 GGUF per test session holds every test tensor: random rows of several distributions
("rand.*"), the tiny llama model's weights ("tiny.*") and slices of the real Gemma 3 270M
dequantized to f32 ("gemma.*"). `llama-quantize --pure` turns that file into each type once (cached
for the session); every tensor it wrote is compared with our quantization of the same f32 rows,
reporting the differing blocks. llama-quantize needs a loadable model, but not one whose tensors
its architecture knows: minimal llama hyperparameters and arbitrary `*.weight` names do.
"""

from __future__ import annotations

import llamacpp
import numpy as np
import pytest
import tinymodels
from ggtrain.kernels.quantize import QUANTIZE_TYPES, quantize, row_bytes
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS", "F16", "BF16")
# llama-quantize's name for the file type whose every matrix (with --pure) has our type.
FTYPE = {t: tinymodels.LLAMA_QUANTIZE_TYPES.get(t, t) for t in TYPES}
# Where a row length is no multiple of 256 llama-quantize falls back to a 32-block type.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "IQ4_XS": "IQ4_NL"}
# Bits per value of each quantizer, for the round-trip error bound.
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4,
        "Q5_K": 5, "Q6_K": 6, "IQ4_NL": 4, "IQ4_XS": 4}


def random_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of one block (256), of 8 blocks (2048) and of 3 (768), in several distributions."""
    out: dict[str, np.ndarray] = {}
    for n in (256, 768, 2048):
        def add(name: str, a: np.ndarray, n: int = n) -> None:
            out[f"rand.{name}.n{n}.weight"] = np.asarray(a, dtype=np.float32)

        add("normal", rng.standard_normal((8, n)))
        add("uniform", rng.uniform(-1, 1, (8, n)))
        spiky = rng.standard_normal((8, n))
        spiky[rng.random((8, n)) < 0.01] *= 50.0  # outliers: one in a hundred values
        add("outliers", spiky)
        zeros = rng.standard_normal((4, n))
        zeros[1] = 0.0  # an all-zero row
        zeros[2, :128] = 0.0  # zero groups next to non-zero ones
        zeros[3, ::2] = -0.0
        add("zeros", zeros)
        for e in (6, 12, 20, 40):  # tiny: near, below GROUP_MAX_EPS (1e-15), and f32 subnormals
            add(f"tiny{e}", rng.standard_normal((2, n)) * 10.0 ** -e)
        add("positive", np.abs(rng.standard_normal((2, n))))
        add("negative", -np.abs(rng.standard_normal((2, n))))
        add("grid", np.round(rng.standard_normal((4, n)) * 4.0) / 4.0)  # many exact ties
        add("constant", np.full((2, n), 0.3))
        halves = rng.integers(-127, 127, (2, n)) + 0.5
        halves[:, ::32] = 127.0  # Q8_0's d = 127/127 = 1: every other value is a rounding tie
        add("halves", halves)
    return out


def tiny_tensors() -> dict[str, np.ndarray]:
    """The tiny llama model's matrices (its F32 file as the tests write it), token_embd cut to 512 rows."""
    reader = GGUFReader(tinymodels.tiny_model("llama", "F32"))
    out = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            a = np.asarray(t.data, dtype=np.float32)
            out[f"tiny.{t.name}"] = np.ascontiguousarray(a[:512] if t.name == "token_embd.weight" else a)
    return out


GEMMA_SLICES = {  # tensor -> rows taken (its type in the file, row length)
    "token_embd.weight": np.r_[0:16, 1000:1016, 200000:200016],  # Q8_0, 640
    "blk.0.attn_q.weight": np.r_[0:32],  # Q5_0, 640
    "blk.3.attn_v.weight": np.r_[0:32],  # Q8_0, 640
    "blk.0.attn_output.weight": np.r_[0:48],  # Q4_K, 1024
    "blk.11.attn_output.weight": np.r_[100:132],  # Q4_K, 1024
    "blk.0.ffn_down.weight": np.r_[0:32],  # Q6_K, 2048
    "blk.17.ffn_down.weight": np.r_[300:332],  # Q6_K, 2048
}


def gemma_tensors(path) -> dict[str, np.ndarray]:
    """Rows of the real model's weights dequantized to f32: values on a quantization grid already."""
    out = {}
    with ModelFile(path) as mf:
        for name, rows in GEMMA_SLICES.items():
            t = mf.tensor(name)
            out[f"gemma.{name}"] = kernels.dequantize(np.ascontiguousarray(t.data[rows]), t.qtype)
    return out


def write_f32_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    """A GGUF llama-quantize loads: llama hyperparameters (no vocabulary) and the 2-D tensors."""
    w = GGUFWriter(path, "llama")
    for key, value in (("context_length", 64), ("embedding_length", 256), ("block_count", 1),
                       ("feed_forward_length", 256), ("attention.head_count", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_file_type(0)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def source(tmp_path_factory, gemma_path):
    """(path of the F32 GGUF, its tensors by name)."""
    tensors = {**random_tensors(np.random.default_rng(14)), **tiny_tensors(), **gemma_tensors(gemma_path)}
    path = tmp_path_factory.mktemp("quantize") / "rows-F32.gguf"
    write_f32_gguf(path, tensors)
    return path, tensors


@pytest.fixture(scope="session")
def llama_quantized(source):
    """type name -> {tensor name: (type llama-quantize gave it, its bytes (rows, row_bytes))}."""
    path, tensors = source
    cache: dict[str, dict[str, tuple[Q, np.ndarray]]] = {}

    def get(qtype: str) -> dict[str, tuple[Q, np.ndarray]]:
        if qtype not in cache:
            dst = path.with_name(f"rows-{qtype}.gguf")
            llamacpp.run("llama-quantize", "--pure", path, dst, FTYPE[qtype], "2")
            got = {}
            for t in GGUFReader(dst).tensors:
                rows = tensors[t.name].shape[0]
                got[t.name] = (Q(t.tensor_type), np.asarray(t.data).view(np.uint8).reshape(rows, -1))
            cache[qtype] = got
        return cache[qtype]
    return get


def assert_same_bytes(prefix: str, qtype: str, tensors: dict[str, np.ndarray],
                      theirs: dict[str, tuple[Q, np.ndarray]]) -> None:
    names = [n for n in tensors if n.startswith(prefix)]
    assert names and set(names) <= set(theirs)
    problems = []
    for name in names:
        x = tensors[name]
        qt, ref = theirs[name]
        expected = FALLBACK.get(qtype, qtype) if x.shape[1] % GGML_QUANT_SIZES[Q[qtype]][0] else qtype
        assert qt.name == expected, f"{name}: llama-quantize wrote {qt.name}, expected {expected}"
        ours = quantize(x, qt)
        if not np.array_equal(ours, ref):
            size = GGML_QUANT_SIZES[qt][1]
            diff = np.nonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1))[0]
            problems.append(f"{name} ({qt.name}, {x.shape}): {diff.size} of {ours.size // size} blocks "
                            f"differ, first at block {diff[0]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("qtype", TYPES)
def test_random_rows_equal_llama_quantize(qtype, source, llama_quantized):
    _, tensors = source
    assert_same_bytes("rand.", qtype, tensors, llama_quantized(qtype))


@pytest.mark.parametrize("qtype", TYPES)
def test_real_rows_equal_llama_quantize(qtype, source, llama_quantized):
    """The tiny model's weights and the real Gemma 3 270M's (whose Q4_K/Q6_K/Q5_0/Q8_0 values sit
    on a grid, so rounding ties are everywhere); 640-wide rows take llama-quantize's fallback type."""
    _, tensors = source
    theirs = llama_quantized(qtype)
    assert_same_bytes("tiny.", qtype, tensors, theirs)
    assert_same_bytes("gemma.", qtype, tensors, theirs)


@pytest.mark.parametrize("qtype", [*BITS, "F16", "BF16", "F32"])
def test_round_trip_error_within_the_types_step(qtype):
    """dequantize(quantize(x)) ≈ x: uniform rows on [-1, 1] have an RMS error of at most half a step of
    a b-bit grid over the range, 1/(2^b - 1) relative to their RMS (10% slack for the f16 scales);
    floats at most their unit roundoff."""
    x = np.random.default_rng(3).uniform(-1, 1, (32, 2048)).astype(np.float32)
    y = kernels.dequantize(quantize(x, Q[qtype]), Q[qtype])
    assert y.shape == x.shape
    rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
    bound = {"F32": 0.0, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}.get(qtype)
    if bound is None:
        bound = 1.1 / (2 ** BITS[qtype] - 1)
    assert rel <= bound, f"{qtype}: relative RMS error {rel:.5f} > {bound:.5f}"


def test_shapes_and_layouts():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 512), dtype=np.float32)
    q = quantize(x, Q.Q4_K)
    assert q.shape == (3, 4, row_bytes(512, Q.Q4_K)) and q.dtype == np.uint8
    assert np.array_equal(q.reshape(12, -1), quantize(x.reshape(12, 512), Q.Q4_K))
    assert np.array_equal(quantize(x[0, 1], Q.Q4_K), q[0, 1])  # one row (1-D)
    wide = rng.standard_normal((4, 1024), dtype=np.float32)
    assert np.array_equal(quantize(wide[:, 256:768], Q.Q6_K), quantize(wide[:, 256:768].copy(), Q.Q6_K))
    assert quantize(np.zeros((0, 256), np.float32), Q.Q8_0).shape == (0, 8 * 34)
    assert np.array_equal(quantize(x[0], Q.F32).view(np.float32), x[0])


def test_rows_are_independent():
    """A row's bytes do not depend on the other rows (rows run in parallel)."""
    x = np.random.default_rng(6).standard_normal((64, 256), dtype=np.float32)
    for qt in (Q.Q3_K, Q.IQ4_XS, Q.Q5_1):
        whole = quantize(x, qt)
        assert all(np.array_equal(whole[r], quantize(x[r:r + 1], qt)[0]) for r in (0, 17, 63))


def test_supported_types_are_all_tested():
    assert {t.name for t in QUANTIZE_TYPES} == {*TYPES, "F32"}


@pytest.mark.parametrize("rows, qtype, message", [
    (np.zeros((2, 256), np.float64), Q.Q4_K, "expected a float32 array"),
    ([[0.0] * 256], Q.Q4_K, "expected a float32 array"),
    (np.zeros((2, 300), np.float32), Q.Q4_0, "multiple of 32"),
    (np.zeros((2, 640), np.float32), Q.Q4_K, "multiple of 256"),
    (np.zeros((2, 256), np.float32), Q.IQ2_XXS, "cannot quantize to IQ2_XXS"),
    (np.zeros((2, 256), np.float32), 99, "unknown tensor type"),
])
def test_bad_input_is_a_clear_error(rows, qtype, message):
    with pytest.raises(GGTrainError, match=message):
        quantize(rows, qtype)
