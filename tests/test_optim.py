"""ggtrain.train.optim: AdamW against a plain float64 transcription of torch.optim.AdamW's update, the
finetune learning-rate schedule, global-norm clipping, state round trip."""

import itertools
import math

import numpy as np
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.train.optim import AdamW, Schedule, clip_grad_norm, global_grad_norm


def reference_adamw(p0, grads, lrs, beta1, beta2, eps, wd):
    """torch.optim.AdamW (amsgrad=False, maximize=False), _single_tensor_adamw, in float64."""
    p = {k: v.astype(np.float64) for k, v in p0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for k in list(p):
            gk = g[k].astype(np.float64)
            p[k] = p[k] * (1 - lr * wd)  # param.mul_(1 - lr * weight_decay)
            m[k] = m[k] + (gk - m[k]) * (1 - beta1)  # exp_avg.lerp_(grad, 1 - beta1)
            v[k] = v[k] * beta2 + (1 - beta2) * gk * gk  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1-beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            denom = np.sqrt(v[k]) / math.sqrt(bias_correction2) + eps
            p[k] = p[k] - step_size * m[k] / denom  # param.addcdiv_(exp_avg, denom, value=-step_size)
    return p


def make_problem(seed=0, steps=40):
    rng = np.random.default_rng(seed)
    p0 = {"a": rng.standard_normal((8, 33)).astype(np.float32),
          "b": rng.standard_normal(1000).astype(np.float32) * 0.01}
    grads = [{k: (rng.standard_normal(x.shape) * 10.0 ** rng.uniform(-4, 1)).astype(np.float32)
              for k, x in p0.items()} for _ in range(steps)]
    return p0, grads


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch_formula(wd):
    p0, grads = make_problem()
    sched = Schedule(lr=3e-3, warmup=5, cos_decay_steps=30, cos_decay_min=0.1)
    lrs = [sched(t) for t in range(1, len(grads) + 1)]
    params = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    for g, lr in zip(grads, lrs):
        opt.step(g, lr=lr)
    ref = reference_adamw(p0, grads, lrs, 0.9, 0.95, 1e-8, wd)
    assert opt.t == len(grads)
    for k, got in params.items():
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref[k], rtol=2e-5, atol=2e-6)
        assert not np.allclose(got, p0[k])  # it did move


def test_adamw_first_step_and_pure_decay():
    p = {"w": np.full(16, 2.0, dtype=np.float32)}
    opt = AdamW(p, lr=0.01, weight_decay=0.0)
    g = np.linspace(-3, 3, 16).astype(np.float32)
    g[g == 0] = 1.0
    opt.step({"w": g})
    # bias correction makes the first step lr·sign(g) (|g| >> eps)
    np.testing.assert_allclose(p["w"], 2.0 - 0.01 * np.sign(g), rtol=1e-6)
    # zero gradients: moments decay, and decoupled weight decay multiplies by (1 - lr·wd) each step
    q = {"w": np.full(4, 3.0, dtype=np.float32)}
    opt = AdamW(q, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.step({"w": np.zeros(4, np.float32)})
    np.testing.assert_allclose(q["w"], 3.0 * (1 - 0.05) ** 3, rtol=1e-6)


def test_adamw_state_round_trip_is_exact():
    p0, grads = make_problem(seed=1, steps=12)
    full = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(full, weight_decay=0.1)
    for g in grads:
        opt.step(g)

    half = {k: v.copy() for k, v in p0.items()}
    opt1 = AdamW(half, weight_decay=0.1)
    for g in grads[:6]:
        opt1.step(g)
    state = opt1.state_dict()
    resumed = {k: v.copy() for k, v in half.items()}
    opt2 = AdamW(resumed, lr=123.0)  # hyper-parameters come from the state
    opt2.load_state_dict(state)
    opt1.step(grads[6])  # the saved state is a copy, not a view of the live moments
    assert state["t"] == 6 and opt2.weight_decay == 0.1 and opt2.lr == 1e-3
    for g in grads[6:]:
        opt2.step(g)
    for k, want in full.items():
        np.testing.assert_array_equal(resumed[k], want)

    with pytest.raises(GGTrainError, match="optimizer state"):
        AdamW({"a": np.zeros((8, 33), np.float32)}).load_state_dict(state)
    bad = opt2.state_dict()
    bad["m"]["a"] = np.zeros((8, 32), np.float32)
    with pytest.raises(GGTrainError, match="shape"):
        opt2.load_state_dict(bad)


def test_adamw_rejects_bad_inputs():
    with pytest.raises(ValueError, match="float32"):
        AdamW({"x": np.zeros(3)})
    opt = AdamW({"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="do not match"):
        opt.step({"y": np.zeros(3, np.float32)})
    with pytest.raises(GGTrainError, match="betas"):
        AdamW({"x": np.zeros(3, np.float32)}, betas=(1.0, 0.9))


def test_clip_grad_norm_like_torch():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((50, 40)).astype(np.float32),
             "b": rng.standard_normal(3_000_000).astype(np.float32)}  # > one float64 chunk
    ref = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert global_grad_norm(grads) == pytest.approx(ref, rel=1e-12)
    before = {k: v.copy() for k, v in grads.items()}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(ref, rel=1e-12)
    coef = 1.0 / (ref + 1e-6)  # torch: max_norm / (total_norm + 1e-6)
    for k, g in grads.items():
        np.testing.assert_allclose(g, before[k] * coef, rtol=1e-6)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    # under the limit: untouched; max_norm 0 disables (finetune's --adam-gclip 0)
    small = {"a": np.full(4, 0.1, np.float32)}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.2, rel=1e-6)
    np.testing.assert_array_equal(small["a"], np.full(4, 0.1, np.float32))
    big = [np.full(4, 10.0, np.float32)]
    assert clip_grad_norm(big, 0.0) == pytest.approx(20.0)
    np.testing.assert_array_equal(big[0], np.full(4, 10.0, np.float32))


def test_schedule_warmup_then_cosine_after_it():
    s = Schedule(lr=1e-3, warmup=10, cos_decay_steps=100, cos_decay_min=0.1)
    assert s(0) == 0.0
    assert s(1) == pytest.approx(1e-4)  # step/warmup
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)  # the warmup ends at the full rate
    # after the warmup: cosine_decay(step - warmup, decay_steps, min), counted from the warmup's end
    for step in (10, 37, 60, 99, 110):
        c = 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert s(step) == pytest.approx(1e-3 * (0.9 * c + 0.1))
    assert s(60) == pytest.approx(1e-3 * 0.55)
    assert s(110) == pytest.approx(1e-4) and s(10_000) == pytest.approx(1e-4)  # stays at the minimum
    steps = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(steps))
    # No warmup: the first step runs at the full rate, the decay over the whole run ends at its last.
    n = 7
    w = Schedule(lr=2e-4, warmup=0, cos_decay_steps=Schedule.whole_run_decay(n, 0), cos_decay_min=0.1)
    assert w(1) == pytest.approx(2e-4) and w(n) == pytest.approx(2e-5)
    one = Schedule(lr=2e-4, warmup=0, cos_decay_steps=Schedule.whole_run_decay(1, 0), cos_decay_min=0.1)
    assert one(1) == pytest.approx(2e-4)  # a 1-step run is not at the minimum
    # no decay
    assert Schedule(lr=0.5, warmup=0, cos_decay_steps=0)(1000) == 0.5


def test_adamw_against_torch_when_installed():
    """The same trajectory as torch.optim.AdamW itself (torch is not a dependency)."""
    torch = pytest.importorskip("torch")
    p0, grads = make_problem(seed=3, steps=25)
    sched = Schedule(lr=2e-3, warmup=3, cos_decay_steps=20, cos_decay_min=0.2)
    params = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.1, foreach=False)
    for t, g in enumerate(grads, start=1):
        lr = sched(t)
        opt.step(g, lr=lr)
        for group in topt.param_groups:
            group["lr"] = lr
        for k, tp in tparams.items():
            tp.grad = torch.from_numpy(g[k].copy())
        topt.step()
    for k, got in params.items():
        np.testing.assert_allclose(got, tparams[k].detach().numpy(), rtol=1e-5, atol=1e-6)
