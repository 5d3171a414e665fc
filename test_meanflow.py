"""Tests of meanflow.py: the JVP target against finite differences, gradients against an independent
recomputation, time sampling statistics, the CFG target (its r = t rows reuse their prediction: checked against
separate no-grad calls, rows counted), and the exact MeanFlow of Gaussian data (closed form).
Tiny networks on CPU; float64 wherever a number is compared tightly."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from scipy import stats

import dit
from dit import DiT, TimestepEmbedder
from meanflow import SIZES, MeanFlow, MeanFlow_defaults, MeanFlow_models, MeanFlowDiT, jvp, predict_and_target, sample
from test_support import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

# torch builds its forward-AD decompositions with torch.jit.script once per process, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")



def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomise_zero_init(m, std=0.1, seed=123):
    # adaLN-Zero starts every block as the identity and the output as 0: most gradients and all JVPs would
    # be trivially zero, so give those layers random values first
    g = torch.Generator().manual_seed(seed)
    layers = [b.adaLN_modulation[-1] for b in m.blocks]
    layers += [m.final_layer.adaLN_modulation[-1], m.final_layer.linear]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * std)
    return m


def tiny_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = MeanFlowDiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    return _randomise_zero_init(m).to(dtype)


def mixed_times(dtype=torch.float64):
    # r = t on rows 0, 2, 5 (not contiguous: the merge back into batch order is exercised)
    t = torch.tensor([0.9, 0.7, 0.6, 0.8, 0.5, 0.3], dtype=dtype)
    r = torch.tensor([0.9, 0.2, 0.6, 0.1, 0.45, 0.3], dtype=dtype)
    return t, r


def batch(B=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (B,), generator=g)
    return x, noise, y


@pytest.fixture
def f64_time_embedding(monkeypatch):
    # dit.timestep_embedding rounds t to float32 (harmless in training); a float64 finite difference with
    # h = 1e-5 needs the sinusoids in float64 too
    def emb(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    monkeypatch.setattr(dit, "timestep_embedding", emb)


# ---------------------------------------------------------------------------------------------------------
# The JVP target and the gradients
# ---------------------------------------------------------------------------------------------------------

def test_jvp_target_matches_central_finite_difference(f64_time_embedding):
    m = tiny_net()
    mf = MeanFlow(omega=1.0, kappa=0.0, class_dropout_prob=0.0)
    t, r = mixed_times()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64)
    v_g = torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 5])  # 5 = null class
    u, u_tgt, _ = predict_and_target(m, z, t, r, y, v_g)

    h = 1e-5
    with torch.no_grad():
        du_dt = (m(z + h * v_g, t + h, r, y) - m(z - h * v_g, t - h, r, y)) / (2 * h)
        u_plain = m(z, t, r, y)
    ne = r != t
    expected = v_g - (t - r).view(-1, 1, 1, 1) * du_dt
    assert _rel(u_tgt[ne], expected[ne]) < 1e-8
    assert _rel((v_g - u_tgt)[ne] / (t - r)[ne].view(-1, 1, 1, 1), du_dt[ne]) < 1e-8
    assert torch.equal(u_tgt[~ne], v_g[~ne])                  # r = t: the target is v_g exactly
    assert _rel(u, u_plain) < 1e-12                           # the primal is the prediction, in batch order
    assert all(b.attn.fused for b in m.blocks)                # fused attention restored after the JVP
    assert not any("forward" in vars(mod) for mod in m.modules())  # and the plain linear layers


def test_jvp_tangent_costs_one_matrix_product_per_linear_layer():
    """torch's forward-mode formula for linear also multiplies by the weight's zero tangent (a second full
    product); inside the JVP each linear layer runs its forward product and one tangent product, and no zero
    tangent of a weight's shape is ever filled."""
    m = tiny_net()
    x, noise, y = batch(B=2)
    t = torch.tensor([0.9, 0.7], dtype=torch.float64)
    n_linear = sum(type(mod) is torch.nn.Linear for mod in m.modules())

    def ops(fn):
        with torch.autograd.profiler.profile(record_shapes=True) as prof:
            fn()
        return prof.key_averages(group_by_input_shape=True)

    with torch.no_grad():
        ev = ops(lambda: jvp(m, x, t, t / 2, y, noise, None))
    products = sum(e.count for e in ev if e.key in ("aten::addmm", "aten::mm"))
    assert products == 2 * n_linear
    weight_shapes = {tuple(p.shape) for p in m.parameters() if p.dim() == 2}
    assert not [e.input_shapes for e in ev if e.key == "aten::fill_" and e.input_shapes
                and tuple(e.input_shapes[0]) in weight_shapes]


def test_gradients_match_independent_recomputation_and_reach_every_parameter():
    m = tiny_net()
    mf = MeanFlow(omega=1.0, kappa=0.5, class_dropout_prob=0.0)  # CFG on: v_g must carry no gradient
    x, noise, y = batch()
    t, r = mixed_times()
    terms = mf.training_losses(m, x, y, t=t, r=r, noise=noise, return_features=1)
    (terms["loss"].mean() + terms["feats"].square().mean()).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters()} - {"pos_embed"}
    assert set(got) == trainable
    assert all(got[n].abs().sum() > 0 for n in trainable), [n for n in trainable if got[n].abs().sum() == 0]

    # reference: one JVP over the whole batch with torch.func, u and feats from a separate plain forward
    m.zero_grad()
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * noise
    v = noise - x
    with torch.no_grad():
        v_g = 1.0 * v + 0.5 * m(z, t, t, y) + (1 - 1.0 - 0.5) * m(z, t, t, torch.full_like(y, 5))
    m.set_fused_attention(False)
    _, du_dt = torch.func.jvp(lambda a, b: m(a, b, r, y), (z, t), (v_g, torch.ones_like(t)))
    m.set_fused_attention(True)
    u, feats = m(z, t, r, y, return_features=1)
    u_tgt = (v_g - (t - r).view(-1, 1, 1, 1) * du_dt).detach()
    L = (u - u_tgt).square().sum(dim=(1, 2, 3))
    loss = L / (L.detach() + 0.01)
    (loss.mean() + feats.square().mean()).backward()

    assert _rel(terms["loss"], loss) < 1e-10
    assert _rel(terms["mse_uv"], (u - v).square().sum(dim=(1, 2, 3))) < 1e-12
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert _rel(got[n], p.grad) < 1e-9, n


def test_sampled_times_take_the_static_split_and_match_explicit_times():
    """Drawn times put the r = t rows first, so the split is by position (no host read); the same draws passed
    explicitly go through the sorting path: same loss, features and gradients."""
    m = tiny_net()
    mf = MeanFlow(omega=1.0, kappa=0.5, class_dropout_prob=0.3)
    x, _, y = batch(B=8)
    results = []
    for explicit in (False, True):
        m.zero_grad()
        torch.manual_seed(7)
        kw = {}
        if explicit:  # the same draws in the same order: t and r, ε; label dropout follows inside
            t, r = mf.sample_times(8, dtype=torch.float64)
            kw = dict(t=t, r=r, noise=torch.randn_like(x))
            assert torch.equal(t[:6], r[:6]) and (t[6:] > r[6:]).all()  # 25% of 8 rows with r != t, last
        terms = mf.training_losses(m, x, y, return_features=1, **kw)
        (terms["loss"].mean() + terms["feats"].square().mean()).backward()
        results.append((terms, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    for k in ("loss", "mse_uv", "feats"):
        assert _rel(a[k], b[k]) < 1e-12, k
    assert set(ga) == set(gb) and all(_rel(ga[n], gb[n]) < 1e-10 for n in ga)


def test_grad_checkpointing_gives_same_gradients():
    mf = MeanFlow(omega=1.0, kappa=0.0, class_dropout_prob=0.0)
    x, noise, y = batch()
    t, r = mixed_times()
    grads = []
    for ckpt in (False, True):
        m = tiny_net()
        m.grad_checkpointing = ckpt
        mf.training_losses(m, x, y, t=t, r=r, noise=noise)["loss"].mean().backward()
        assert m.grad_checkpointing == ckpt                   # restored after the JVP
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-12


def test_compiled_network_gives_same_loss_and_gradients():
    mf = MeanFlow(omega=1.0, kappa=0.5, class_dropout_prob=0.3)
    x, _, y = batch(B=8, dtype=torch.float32)
    results = []
    for compiled in (False, True):
        m = tiny_net(torch.float32)
        m.grad_checkpointing = True                           # must be off inside the JVP of the eager module
        net = torch.compile(m, backend="eager") if compiled else m
        torch.manual_seed(8)
        loss = mf.training_losses(net, x, y, return_features=1)["loss"]
        loss.mean().backward()
        results.append((loss, [p.grad for p in m.parameters() if p.requires_grad]))
    assert _rel(results[1][0], results[0][0]) < 1e-6
    for a, b in zip(results[0][1], results[1][1]):
        assert _rel(b, a) < 1e-5


def test_jvp_runs_in_float32_under_autocast():
    m = tiny_net(torch.float32)
    mf = MeanFlow(omega=1.0, kappa=0.0, class_dropout_prob=0.0)
    t, r = mixed_times(torch.float32)
    g = torch.Generator().manual_seed(3)
    z, v_g = torch.randn(2, 6, 2, 8, 8, generator=g)
    y = torch.arange(6) % 5
    u32, tgt32, _ = predict_and_target(m, z, t, r, y, v_g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u16, tgt16, _ = predict_and_target(m, z, t, r, y, v_g)
    ne = r != t
    assert u16.dtype == tgt16.dtype == torch.float32
    assert _rel(u16[ne], u32[ne]) < 1e-6 and _rel(tgt16[ne], tgt32[ne]) < 1e-6   # JVP rows: float32 inside
    assert 1e-6 < _rel(u16[~ne], u32[~ne]) < 5e-2                                  # plain rows: bf16


def test_return_features_come_from_the_same_forward():
    m = tiny_net()
    mf = MeanFlow(omega=1.0, kappa=0.0, class_dropout_prob=0.0)
    x, noise, y = batch()
    t, r = mixed_times()
    terms = mf.training_losses(m, x, y, t=t, r=r, noise=noise, return_features=2)
    tb = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        u, feats = m((1 - tb) * x + tb * noise, t, r, y, return_features=2)
        assert torch.equal(m((1 - tb) * x + tb * noise, t, r, y), u)
    assert terms["feats"].shape == (6, 4, 32)
    assert _rel(terms["feats"], feats) < 1e-12
    assert mf.training_losses(m, x, y, t=t, r=r, noise=noise)["feats"] is None


def test_ddp_wrapped_module_matches_direct_call(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Holder(nn.Module):  # what the trainer wraps in DDP: network + objective
        def __init__(self, model, mf):
            super().__init__()
            self.model, self.mf = model, mf

        def forward(self, x, y):
            terms = self.mf.training_losses(self.model, x, y, return_features=1)
            return terms["loss"].mean() + 0.5 * terms["feats"].square().mean()

    mf = MeanFlow(omega=1.0, kappa=0.5, class_dropout_prob=0.3)
    x, _, y = batch(B=8, dtype=torch.float32)
    base = tiny_net(torch.float32)
    plain = copy.deepcopy(base)
    if dist.is_initialized():
        pytest.skip("another test left a process group initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DDP(Holder(base, mf))
        torch.manual_seed(7)
        loss_ddp = ddp(x, y)
        loss_ddp.backward()
        with pytest.raises(ValueError, match="DDP"):
            mf.training_losses(ddp, x, y)
    finally:
        dist.destroy_process_group()
    torch.manual_seed(7)
    loss_plain = Holder(plain, mf)(x, y)
    loss_plain.backward()
    assert torch.equal(loss_ddp, loss_plain)
    for (n, a), b in zip(base.named_parameters(), plain.parameters()):
        if a.requires_grad:
            assert a.grad is not None and _rel(a.grad, b.grad) < 1e-6, n


# ---------------------------------------------------------------------------------------------------------
# Time sampling
# ---------------------------------------------------------------------------------------------------------

def test_fixed_fraction_of_rows_with_r_not_t():
    mf = MeanFlow()
    torch.manual_seed(0)
    for B in (1, 2, 3, 4, 7, 8, 10, 256):
        t, r = mf.sample_times(B)
        ne = r != t
        k = math.ceil(B / 4)
        assert int(ne.sum()) == k
        assert ne[B - k:].all() and not ne[:B - k].any()      # the last ⌈B/4⌉ rows
        assert (t >= r).all() and (t > 0).all() and (t < 1).all()
    assert MeanFlow().num_r_neq_t(256) == 64
    assert MeanFlow(r_neq_t_ratio=0.0).num_r_neq_t(10) == 0
    assert MeanFlow(r_neq_t_ratio=1.0).num_r_neq_t(10) == 10
    assert MeanFlow(r_neq_t_ratio=0.5).num_r_neq_t(7) == 4


def test_logit_normal_time_statistics():
    torch.manual_seed(0)
    N, mu, sd = 40000, -0.4, 1.0
    t, r = MeanFlow(r_neq_t_ratio=1.0).sample_times(N)
    a, b = torch.logit(t.double()).numpy(), torch.logit(r.double()).numpy()
    phi = lambda q: stats.norm.cdf(q, loc=mu, scale=sd)
    # t = max and r = min of two i.i.d. N(μ, σ²) draws (in logit space)
    assert stats.kstest(a, lambda q: phi(q) ** 2).pvalue > 1e-3
    assert stats.kstest(b, lambda q: 1 - (1 - phi(q)) ** 2).pvalue > 1e-3
    both = torch.cat([torch.from_numpy(a), torch.from_numpy(b)])
    assert abs(both.mean().item() - mu) < 4 * sd / math.sqrt(N)
    assert abs(both.std().item() - sd) < 0.02
    # with the default 25%, t is still the max on every row (the r = t rows just copy it)
    t, r = MeanFlow().sample_times(N)
    assert stats.kstest(torch.logit(t.double()).numpy(), lambda q: phi(q) ** 2).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------------
# CFG in training, label dropout, adaptive weight
# ---------------------------------------------------------------------------------------------------------

class ToyModel:
    """u depends on the label (the null class 3 included), z, t and r; records the labels of every call."""
    num_classes = 3

    def __init__(self):
        self.labels = []

    def __call__(self, z, t, r, y, return_features=None):
        self.labels.append(y.clone())
        a = (y.to(z.dtype) + 1).view(-1, 1, 1, 1)
        return a * torch.tanh(z) + (t + 2 * r).view(-1, 1, 1, 1) * z.square()


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_cfg_target_dropout_and_adaptive_loss_match_manual_formula(p):
    omega, kappa, lo, hi, c = 0.2, 0.92, 0.0, 0.75, 0.01
    mf = MeanFlow(omega=omega, kappa=kappa, t_interval=(lo, hi), class_dropout_prob=0.5, adaptive_p=p)
    B = 8
    g = torch.Generator().manual_seed(4)
    x, noise = torch.randn(2, B, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    t = torch.tensor([0.1, 0.9, 0.5, 0.75, 0.3, 0.8, 0.6, 0.2], dtype=torch.float64)  # 0.8, 0.9 outside
    for seed in range(100):                                   # a seed that drops some rows but not all
        torch.manual_seed(seed)
        k = int((torch.rand(B) < 0.5).sum())                  # given t, r, ε the only draw is the dropout
        if 2 <= k <= 5:
            break
    model = ToyModel()
    torch.manual_seed(seed)
    terms = mf.training_losses(model, x, y, t=t, r=t, noise=noise)

    drop = torch.arange(B) < k                                # the first k rows (as the official code)
    y_in = torch.where(drop, 3, y)
    assert torch.equal(model.labels[-1], y_in)
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * noise
    v = noise - x
    guided = omega * v + kappa * model(z, t, t, y) + (1 - omega - kappa) * model(z, t, t, torch.full_like(y, 3))
    use = ((t >= lo) & (t <= hi) & ~drop).view(-1, 1, 1, 1)
    v_g = torch.where(use, guided, v)                         # r = t everywhere: u_tgt = v_g
    u = model(z, t, t, y_in)
    L = (u - v_g).square().sum(dim=(1, 2, 3))
    assert _rel(terms["loss"], L / (L + c) ** p) < 1e-12
    assert _rel(terms["mse_uv"], (u - v).square().sum(dim=(1, 2, 3))) < 1e-12


def _seed_dropping(k, B, p):
    # given t, r and ε the only draw is the label dropout: a seed whose mask drops exactly the first k rows
    for seed in range(1000):
        torch.manual_seed(seed)
        if int((torch.rand(B) < p).sum()) == k:
            return seed
    raise AssertionError("no seed found")


def guided_times(dtype=torch.float64):
    # rows 0-4 r = t, rows 5-7 r ≠ t; with interval [0, 0.75] and the first 2 rows dropped: guided r = t rows
    # 2, 3, guided r ≠ t rows 5, 6, unguided: 0 (dropped), 1 (dropped, outside), 4 (r = t, outside), 7 (outside)
    t = torch.tensor([0.5, 0.9, 0.6, 0.3, 0.8, 0.7, 0.4, 0.85], dtype=dtype)
    r = torch.tensor([0.5, 0.9, 0.6, 0.3, 0.8, 0.2, 0.1, 0.5], dtype=dtype)
    return t, r


def reference_guided_loss(mf, model, x, y, t, r, noise, drop, null):
    """The plain formulation: v_g from no-grad calls u(z, t, t | y) and u(z, t, t | ∅) on every row, kept where
    t is in the interval and the label is kept; then the loss of predict_and_target's u and u_tgt."""
    lo, hi = mf.t_interval
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * noise
    v = noise - x
    with torch.no_grad():
        guided = (mf.omega * v + mf.kappa * model(z, t, t, y)
                  + (1 - mf.omega - mf.kappa) * model(z, t, t, torch.full_like(y, null)))
    use = ((t >= lo) & (t <= hi) & ~drop).view(-1, 1, 1, 1)
    v_g = torch.where(use, guided, v)
    u, u_tgt, _ = predict_and_target(model, z, t, r, torch.where(drop, null, y), v_g)
    L = (u - u_tgt).square().sum(dim=(1, 2, 3))
    return L / (L.detach() + mf.adaptive_c) ** mf.adaptive_p, v_g


@pytest.mark.parametrize("omega,kappa,interval", [
    (1.0, 0.5, (0.0, 1.0)),        # B/2, M/2
    (0.2, 0.92, (0.0, 0.75)),      # XL/2
    (0.5, 0.5, (0.0, 0.75)),       # 1 − ω − κ = 0: no unconditional call
    (3.0, 0.0, (0.0, 1.0)),        # B/4: κ = 0, nothing taken from the prediction
])
def test_guided_target_reusing_the_prediction_matches_separate_calls(omega, kappa, interval):
    mf = MeanFlow(omega=omega, kappa=kappa, t_interval=interval, class_dropout_prob=0.3)
    m = tiny_net()
    x, noise, y = batch(B=8)
    t, r = guided_times()
    seed = _seed_dropping(2, 8, 0.3)
    torch.manual_seed(seed)
    loss = mf.training_losses(m, x, y, t=t, r=r, noise=noise)["loss"]
    loss.mean().backward()
    got = [p.grad.clone() for p in m.parameters() if p.requires_grad]

    m.zero_grad()
    drop = torch.arange(8) < 2
    ref, v_g = reference_guided_loss(mf, m, x, y, t, r, noise, drop, null=5)
    ref.mean().backward()
    assert _rel(loss, ref) < 1e-10
    for a, p in zip(got, (p for p in m.parameters() if p.requires_grad)):
        assert _rel(a, p.grad) < 1e-9
    # the public guided_velocity still gives the whole v_g
    tb = t.view(-1, 1, 1, 1)
    assert _rel(mf.guided_velocity(m, (1 - tb) * x + tb * noise, t, y, noise - x, drop), v_g) < 1e-12
    if omega != 1.0 or kappa != 0.0:
        assert _rel(v_g, noise - x) > 1e-3                     # guidance changes the target at all


class CountingModel(ToyModel):
    """ToyModel that records the rows of each call and whether it ran with gradient."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, z, t, r, y, return_features=None):
        self.calls.append((len(y), torch.is_grad_enabled()))
        return super().__call__(z, t, r, y, return_features)


def test_guidance_forward_skips_the_rows_whose_prediction_is_reused():
    B = 8
    x, noise, y = batch(B=B)
    y = y % 3
    t, r = guided_times()                                     # guided rows: r = t 2, 3; r ≠ t 5, 6
    seed = _seed_dropping(2, B, 0.3)
    # (ω, κ, rows of the no-grad call before: u(·|y) and u(·|∅) each on all 4 guided rows, now)
    for omega, kappa, before, now in ((1.0, 0.5, 8, 6), (0.2, 0.92, 8, 6), (0.5, 0.5, 4, 2), (3.0, 0.0, 4, 4)):
        model = CountingModel()
        mf = MeanFlow(omega=omega, kappa=kappa, t_interval=(0.0, 0.75), class_dropout_prob=0.3)
        torch.manual_seed(seed)
        mf.training_losses(model, x, y, t=t, r=r, noise=noise)
        # one no-grad call, then the plain forward on the 5 r = t rows and the JVP on the 3 r ≠ t rows
        assert model.calls == [(now, False), (5, True), (3, True)], (omega, kappa)
        assert before - now == (2 if kappa != 0.0 else 0)      # κ ≠ 0: the 2 guided r = t rows are saved
        expected = [y[5], y[6]] if kappa != 0.0 else []       # u(·|y) only for the guided r ≠ t rows
        expected += [3] * (4 if omega + kappa != 1.0 else 0)   # u(·|∅) for every guided row
        assert model.labels[0].tolist() == [int(a) for a in expected], (omega, kappa)


def test_no_guidance_calls_when_omega_1_kappa_0_and_errors():
    model = ToyModel()
    x, noise, y = batch(B=4)
    y = y % 3
    t = torch.full((4,), 0.5, dtype=torch.float64)
    MeanFlow(omega=1.0, kappa=0.0, class_dropout_prob=0.0).training_losses(model, x, y, t=t, r=t, noise=noise)
    assert len(model.labels) == 1                              # only the prediction itself
    with pytest.raises(ValueError, match="both t and r"):
        MeanFlow().training_losses(model, x, y, t=t)
    with pytest.raises(ValueError, match="t >= r"):
        MeanFlow().training_losses(model, x, y, t=t, r=t + 0.1)
    with pytest.raises(ValueError, match="null-class label"):
        m = MeanFlowDiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                        num_classes=5, class_dropout_prob=0.0)
        MeanFlow().training_losses(m, x.float(), y)
    with pytest.raises(AssertionError):
        MeanFlow(t_interval=(0.5, 0.2))


# ---------------------------------------------------------------------------------------------------------
# The exact MeanFlow of Gaussian data
# ---------------------------------------------------------------------------------------------------------

class GaussianMeanFlow:
    """Exact average velocity for x ~ N(μ, s²) per dimension, z_t = (1 − t)x + tε.

    z_t ~ N(m_t, σ_t²) with m_t = (1 − t)μ, σ_t² = (1 − t)²s² + t²; the flow map is the monotone affine
    transport z_r = m_r + (σ_r/σ_t)(z_t − m_t), so u(z, t, r) = (z − z_r)/(t − r), and at r = t the marginal
    velocity E[ε − x | z_t = z] = −μ + (t − (1 − t)s²)/σ_t² · (z − m_t).
    """

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def sigma(self, t):
        return ((1 - t) ** 2 * self.s ** 2 + t ** 2).sqrt()

    def __call__(self, z, t, r, y, return_features=None):
        t, r = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        mt, mr, st, sr = (1 - t) * self.mu, (1 - r) * self.mu, self.sigma(t), self.sigma(r)
        inst = -self.mu + (t - (1 - t) * self.s ** 2) / st ** 2 * (z - mt)
        same = t == r
        avg = (z - mr - sr / st * (z - mt)) / torch.where(same, torch.ones_like(t), t - r)
        return torch.where(same, inst, avg)


def gaussian_data(C=2, H=2, W=2):
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(C, H, W, generator=g, dtype=torch.float64)
    s = 0.3 + torch.rand(C, H, W, generator=g, dtype=torch.float64)
    return mu, s


def test_exact_gaussian_meanflow_sampling_reproduces_data():
    mu, s = gaussian_data()
    model = GaussianMeanFlow(mu, s)
    N = 20000
    z1 = torch.randn(N, *mu.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.zeros(N, dtype=torch.long)
    calls = []
    x0 = sample(lambda *a: calls.append(1) or model(*a), z1, y)
    assert len(calls) == 1                                    # 1-NFE
    assert _rel(x0, mu + s * z1) < 1e-12                      # the exact transport, sample by sample
    assert ((x0.mean(0) - mu).abs() < 5 * s / math.sqrt(N)).all()
    assert ((x0.std(0) / s - 1).abs() < 5 / math.sqrt(2 * N)).all()
    for steps in (2, 3):                                      # composing exact maps changes nothing
        assert _rel(sample(model, z1, y, num_steps=steps), mu + s * z1) < 1e-12


def test_exact_average_velocity_is_the_fixed_point_of_the_target():
    """E[u_tgt | z_t] = u for the exact u (the MeanFlow identity with the conditional velocity ε − x)."""
    mu, s = gaussian_data()
    model = GaussianMeanFlow(mu, s)
    mf = MeanFlow(omega=1.0, kappa=0.0, class_dropout_prob=0.0)
    K = 20000
    g = torch.Generator().manual_seed(7)
    z_val = torch.randn(*mu.shape, generator=g, dtype=torch.float64)
    for t_val, r_val in ((0.7, 0.2), (0.5, 0.0), (0.9, 0.6), (0.4, 0.4)):
        z = z_val.expand(K, *mu.shape)
        t = torch.full((K,), t_val, dtype=torch.float64)
        r = torch.full((K,), r_val, dtype=torch.float64)
        y = torch.zeros(K, dtype=torch.long)
        st2 = (1 - t_val) ** 2 * s ** 2 + t_val ** 2
        post_mean = mu + (1 - t_val) * s ** 2 / st2 * (z_val - (1 - t_val) * mu)   # x | z_t is Gaussian
        post_std = (s ** 2 - (1 - t_val) ** 2 * s ** 4 / st2).sqrt()
        x = post_mean + post_std * torch.randn(K, *mu.shape, generator=g, dtype=torch.float64)
        eps = (z - (1 - t_val) * x) / t_val
        u, u_tgt, _ = predict_and_target(model, z, t, r, y, eps - x)
        se = u_tgt.std(0) / math.sqrt(K)
        assert ((u_tgt.mean(0) - u[0]).abs() < 5 * se + 1e-12).all(), (t_val, r_val)
        # u_tgt is affine in (x, ε) given z_t, so its posterior mean is the target at the posterior mean
        x_bar = post_mean.expand(1, *mu.shape)
        eps_bar = (z[:1] - (1 - t_val) * x_bar) / t_val
        _, tgt_bar, _ = predict_and_target(model, z[:1], t[:1], r[:1], y[:1], eps_bar - x_bar)
        assert _rel(tgt_bar[0], u[0]) < 1e-10


# ---------------------------------------------------------------------------------------------------------
# Sampler, network and registry
# ---------------------------------------------------------------------------------------------------------

def test_sampler_time_grid_and_errors():
    calls = []

    def model(z, t, r, y):
        calls.append((t[0].item(), r[0].item()))
        return torch.ones_like(z) * (t - r).view(-1, 1, 1, 1)

    z = torch.zeros(2, 1, 2, 2)
    y = torch.zeros(2, dtype=torch.long)
    out = sample(model, z, y, num_steps=2)
    assert calls == [(1.0, 0.5), (0.5, 0.0)]
    assert torch.allclose(out, torch.full_like(z, -0.5))       # −(0.5·0.5 + 0.5·0.5)
    calls.clear()
    sample(model, z, y, time_grid=[1.0, 0.8, 0.0])
    assert calls == [(1.0, pytest.approx(0.8)), (pytest.approx(0.8), 0.0)]
    for bad in (dict(time_grid=[0.0, 1.0]), dict(time_grid=[1.0]), dict(num_steps=0)):
        with pytest.raises(ValueError, match="time_grid"):
            sample(model, z, y, **bad)


def test_network_conditioning_and_no_label_dropout_in_train_mode():
    torch.manual_seed(0)
    m = _randomise_zero_init(MeanFlowDiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=2,
                                         num_heads=2, num_classes=5, class_dropout_prob=0.5))
    B = 64
    x = torch.randn(B, 2, 8, 8)
    t, r = torch.rand(B), torch.rand(B) * 0.5
    r = torch.minimum(t, r)
    y = torch.randint(0, 6, (B,))
    m.train()
    out = m(x, t, r, y)
    with torch.no_grad():
        c = m.t_embedder(t) + m.h_embedder(t - r) + m.y_embedder.embedding_table(y)   # t, h raw in [0, 1]
        assert torch.allclose(out, m.forward_tokens(x, c), atol=1e-6)
        m.eval()
        assert torch.equal(m(x, t, r, y), out)                 # no label dropout inside the network
    assert out.shape == x.shape and m.out_channels == 2
    plain = DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                class_dropout_prob=0.5, learn_sigma=False)
    extra = sum(p.numel() for p in TimestepEmbedder(32).parameters())
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in plain.parameters()) + extra
    fresh = MeanFlowDiT(input_size=8, patch_size=4, in_channels=2, hidden_size=64, depth=1, num_heads=2)
    for lin in (fresh.h_embedder.mlp[0], fresh.h_embedder.mlp[2]):  # initialised as DiT's t_embedder
        assert abs(lin.weight.std().item() - 0.02) < 0.002 and not lin.bias.any()


def test_registry_matches_the_paper():
    assert set(MeanFlow_models) == set(MeanFlow_defaults) == {
        "MeanFlow-B/4", "MeanFlow-B/2", "MeanFlow-M/2", "MeanFlow-L/2", "MeanFlow-XL/2", "MeanFlow-T/2", "MeanFlow-T/4"}
    paper = {"B": (12, 768, 12), "M": (16, 1024, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert {k: SIZES[k] for k in paper} == paper and SIZES["T"] == dit.SIZES["T"]
    with torch.device("meta"):
        for name, build in MeanFlow_models.items():
            m = build(input_size=32)
            size, patch = name[len("MeanFlow-"):].split("/")
            assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (*SIZES[size], int(patch)), name
            assert not m.learn_sigma and m.out_channels == m.in_channels
    assert MeanFlow_defaults["MeanFlow-T/4"] == MeanFlow_defaults["MeanFlow-T/2"] == MeanFlow_defaults["MeanFlow-B/2"]
    assert MeanFlow_defaults["MeanFlow-B/2"] == dict(omega=1.0, kappa=0.5, t_interval=(0.0, 1.0))
    assert MeanFlow_defaults["MeanFlow-L/2"] == dict(omega=0.2, kappa=0.92, t_interval=(0.0, 0.8))
    assert MeanFlow_defaults["MeanFlow-XL/2"] == dict(omega=0.2, kappa=0.92, t_interval=(0.0, 0.75))
    for name, cfg in MeanFlow_defaults.items():
        mf = MeanFlow(**cfg)
        assert (mf.r_neq_t_ratio, mf.logit_mean, mf.logit_std, mf.adaptive_p, mf.adaptive_c,
                mf.class_dropout_prob) == (0.25, -0.4, 1.0, 1.0, 0.01, 0.1)
