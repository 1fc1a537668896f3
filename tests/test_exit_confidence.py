"""exit_confidence against softmax of full fp64 logits, both backends (Triton interpreted)."""
import importlib

import pytest
import torch

from fastexit.kernels import HAS_TRITON, ExitStats, exit_confidence, weighted_linear_cross_entropy

ec = importlib.import_module("fastexit.kernels.exit_confidence")  # the module, not the function

NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]
# (N, d, V): odd V, N not a multiple of the row block; the Triton shapes stay tiny (interpreter)
CASES = [("torch", 37, 64, 1000), ("torch", 300, 48, 1003),
         pytest.param("triton", 19, 40, 77, marks=NEEDS_TRITON),
         pytest.param("triton", 33, 72, 130, marks=NEEDS_TRITON)]


def reference(hidden, weight, targets=None, ignore_index=-100):
    logits = hidden.double() @ weight.double().T  # (N, V)
    lse = logits.logsumexp(1)
    conf = logits.softmax(1).max(1).values
    classes = torch.arange(logits.shape[1]).expand_as(logits)
    is_max = logits == logits.max(1, keepdim=True).values
    pred = torch.where(is_max, classes, logits.shape[1]).min(1).values  # the first maximum
    if targets is None:
        return conf, pred, lse, None
    valid = targets != ignore_index
    nll = lse - logits.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return conf, pred, lse, torch.where(valid, nll, 0.0)


def make(n, d, v, scale=0.5, dtype=torch.float32):
    hidden = torch.randn(n, d, dtype=dtype)
    weight = (torch.randn(v, d) * scale / d**0.5 * 8).to(dtype)  # logits of a few units
    targets = torch.randint(0, v, (n,))
    targets[::5] = -100
    return hidden, weight, targets


def assert_matches(stats, ref, atol=2e-5):
    conf, pred, lse, nll = ref
    assert stats.conf.dtype == stats.lse.dtype == torch.float32 and stats.pred.dtype == torch.int64
    torch.testing.assert_close(stats.conf.double(), conf, atol=atol, rtol=1e-5)
    torch.testing.assert_close(stats.lse.double(), lse, atol=atol, rtol=1e-5)
    assert torch.equal(stats.pred, pred)
    if nll is None:
        assert stats.nll is None
    else:
        torch.testing.assert_close(stats.nll.double(), nll, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend,n,d,v", CASES)
@pytest.mark.parametrize("with_targets", [True, False])
def test_matches_fp64_softmax(backend, n, d, v, with_targets):
    hidden, weight, targets = make(n, d, v)
    targets = targets if with_targets else None
    stats = exit_confidence(hidden, weight, targets, backend=backend)
    assert isinstance(stats, ExitStats)
    assert_matches(stats, reference(hidden, weight, targets))
    if with_targets:
        assert torch.all(stats.nll[::5] == 0)


def test_torch_path_chunks_rows(monkeypatch):
    monkeypatch.setattr(ec, "CHUNK_BYTES", 4 * 1000 * 7)  # 7 rows per chunk: many chunks, a ragged last one
    hidden, weight, targets = make(50, 32, 1000)
    assert_matches(exit_confidence(hidden, weight, targets, backend="torch"), reference(hidden, weight, targets))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_one_row(backend):
    hidden, weight, targets = make(1, 24, 77)
    targets[0] = 3
    stats = exit_confidence(hidden, weight, targets, ignore_index=3, backend=backend)
    assert stats.nll.shape == (1,) and stats.nll[0] == 0
    assert_matches(exit_confidence(hidden, weight, targets, ignore_index=-1, backend=backend),
                   reference(hidden, weight, targets, ignore_index=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_confident_rows_stay_finite(backend):
    hidden, weight, targets = make(17, 32, 77, scale=300.0)  # logits in the thousands
    stats = exit_confidence(hidden, weight, targets, backend=backend)
    conf, pred, lse, nll = reference(hidden, weight, targets)
    assert torch.isfinite(stats.lse).all() and torch.isfinite(stats.nll).all()
    assert stats.conf.max() > 0.999
    torch.testing.assert_close(stats.conf.double(), conf, atol=1e-5, rtol=0)
    assert torch.equal(stats.pred, pred)
    torch.testing.assert_close(stats.lse.double(), lse, atol=2e-3, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_the_first_class(backend):
    hidden, weight, _ = make(16, 32, 77)
    weight[3] = weight[70] = hidden[0] * 4  # class 70 lies in another vocabulary tile
    stats = exit_confidence(hidden, weight, backend=backend)
    assert stats.pred[0] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_error_within_twice_pytorch_own(backend):
    hidden, weight, targets = make(64, 64, 1000, dtype=torch.bfloat16)
    conf, _, lse, _ = reference(hidden, weight, targets)
    own = (hidden @ weight.T).float()  # PyTorch's own bf16 logits
    own_err = (own.logsumexp(1).double() - lse).abs().max()
    stats = exit_confidence(hidden, weight, targets, backend=backend)
    assert (stats.lse.double() - lse).abs().max() <= 2 * own_err + 1e-6
    own_conf_err = (own.softmax(1).max(1).values.double() - conf).abs().max()
    assert (stats.conf.double() - conf).abs().max() <= 2 * own_conf_err + 1e-6


# ----------------------------------------------------------------------------- Triton split kernel
# (N, d, V) that reach several vocabulary splits with a ragged last split (and a ragged last
# tile): decode steps (N = 1, 3, 64: 16-row blocks) and training-like batches (N not a multiple
# of any row block, V odd; one with several row blocks and vocabulary splits at once)
SPLIT_SHAPES = [(1, 40, 1000), (3, 24, 1000), (64, 32, 1000), (70, 16, 5003), (150, 24, 1003)]


def split_plan(n, v):
    return ec._split_plan(n, v, torch.float32, torch.device("cpu"))


@NEEDS_TRITON
@pytest.mark.parametrize("n,d,v", SPLIT_SHAPES)
def test_shapes_reach_several_ragged_splits(n, d, v):
    plan = split_plan(n, v)
    assert plan.n_splits > 1 and v % plan.split_v and v % plan.tiles.block_v
    assert n <= ec.DECODE_ROWS or n % plan.tiles.block_m  # training-like: a ragged last row block


@NEEDS_TRITON
@pytest.mark.parametrize("n,d,v", SPLIT_SHAPES)
@pytest.mark.parametrize("with_targets", [True, False])
def test_split_kernel_matches_fp64_and_torch_path(n, d, v, with_targets):
    hidden, weight, targets = make(n, d, v)
    targets = targets if with_targets else None
    stats = exit_confidence(hidden, weight, targets, backend="triton")
    assert_matches(stats, reference(hidden, weight, targets))
    torch_stats = exit_confidence(hidden, weight, targets, backend="torch")
    assert torch.equal(stats.pred, torch_stats.pred)
    for ours, theirs in zip(stats, torch_stats):
        if ours is not None:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@NEEDS_TRITON
def test_more_splits_than_one_combine_tile(monkeypatch):
    monkeypatch.setattr(ec, "INTERPRET_SM_COUNT", 64)  # as a big GPU sees a decode step
    hidden, weight, targets = make(2, 16, 5003)
    plan = split_plan(2, 5003)
    assert plan.n_splits > ec.COMBINE_BLOCK_S and plan.n_splits % ec.COMBINE_BLOCK_S
    assert_matches(exit_confidence(hidden, weight, targets, backend="triton"), reference(hidden, weight, targets))


@NEEDS_TRITON
@pytest.mark.parametrize("sm_count", [ec.INTERPRET_SM_COUNT, 64])  # split boundary; combine-tile boundary
def test_tie_across_a_split_boundary_picks_the_first_class(monkeypatch, sm_count):
    monkeypatch.setattr(ec, "INTERPRET_SM_COUNT", sm_count)
    n, d, v = 3, 16, 5003
    plan = split_plan(n, v)
    later_split = ec.COMBINE_BLOCK_S if plan.n_splits > ec.COMBINE_BLOCK_S else 1
    later = plan.split_v * later_split  # the first class of that split
    hidden = torch.randint(-3, 4, (n, d)).float()  # integers: every logit is exact, the tie too
    hidden[0, 0] = 3  # row 0's top logit |h|^2 >= 9 beats every other class's (<= 6)
    weight = torch.randint(-1, 2, (v, d)).float() / 8
    weight[[later - 1, later, later + 1, v - 1]] = hidden[0]  # the top logit 4x, straddling the boundary
    stats = exit_confidence(hidden, weight, backend="triton")
    assert stats.pred[0] == later - 1
    assert_matches(stats, reference(hidden, weight))


@NEEDS_TRITON
@pytest.mark.parametrize("n", [1, 64, 150])
def test_ties_everywhere_match_the_first_maximum(n):
    hidden = torch.randint(-2, 3, (n, 8)).float()  # integer logits in [-32, 32] over 1003 classes
    weight = torch.randint(-2, 3, (1003, 8)).float()
    conf, pred, lse, _ = reference(hidden, weight)
    stats = exit_confidence(hidden, weight, backend="triton")
    assert (conf < 0.5).any()  # many rows tie at the top
    assert torch.equal(stats.pred, pred)
    assert torch.equal(exit_confidence(hidden, weight, backend="torch").pred, pred)
    torch.testing.assert_close(stats.conf.double(), conf, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.lse.double(), lse, atol=1e-5, rtol=1e-6)


@NEEDS_TRITON
@pytest.mark.parametrize("n", [1, 70])
def test_split_kernel_very_confident_rows(n):
    hidden, weight, targets = make(n, 16, 1000, scale=300.0)  # logits in the thousands
    conf, pred, lse, nll = reference(hidden, weight, targets)
    stats = exit_confidence(hidden, weight, targets, backend="triton")
    assert split_plan(n, 1000).n_splits > 1 and conf.max() > 0.999
    assert torch.isfinite(stats.lse).all() and torch.isfinite(stats.nll).all()
    torch.testing.assert_close(stats.conf.double(), conf, atol=1e-5, rtol=0)
    assert torch.equal(stats.pred, pred)
    torch.testing.assert_close(stats.lse.double(), lse, atol=2e-3, rtol=1e-6)
    torch.testing.assert_close(stats.nll.double(), nll, atol=2e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    hidden, weight, targets = make(5, 16, 1000)
    stats = exit_confidence(hidden, weight, targets.fill_(-100), backend=backend)
    assert torch.equal(stats.nll, torch.zeros(5))
    assert_matches(stats, reference(hidden, weight, targets))


# ----------------------------------------------------------------------------- margin
MARGIN_TOL = {torch.float32: 2e-5, torch.bfloat16: None, torch.float16: None}  # None: 2x PyTorch's own error


def reference_margin(hidden, weight):
    """Top-1 minus top-2 softmax probability of the fp64 logits (N,); the top-1 alone for V = 1."""
    probs = (hidden.double() @ weight.double().T).softmax(1)  # (N, V)
    top = probs.topk(min(2, probs.shape[1]), 1).values
    return top[:, 0] - top[:, 1] if probs.shape[1] > 1 else top[:, 0]


def assert_margin(hidden, weight, targets=None, backend="torch", atol=2e-5):
    """want_margin: margin against fp64, every other field bit for bit the same as without it."""
    stats = exit_confidence(hidden, weight, targets, want_margin=True, backend=backend)
    plain = exit_confidence(hidden, weight, targets, backend=backend)
    assert plain.margin is None and stats.margin.dtype == torch.float32 and stats.margin.shape == (len(hidden),)
    for ours, theirs in zip(stats[:4], plain[:4]):
        assert ours is theirs is None or torch.equal(ours, theirs)
    torch.testing.assert_close(stats.margin.double(), reference_margin(hidden, weight), atol=atol, rtol=1e-5)
    return stats


@pytest.mark.parametrize("backend,n,d,v", CASES)
@pytest.mark.parametrize("with_targets", [True, False])
def test_margin_matches_fp64(backend, n, d, v, with_targets):
    hidden, weight, targets = make(n, d, v)
    assert_margin(hidden, weight, targets if with_targets else None, backend)


@NEEDS_TRITON
@pytest.mark.parametrize("n,d,v", SPLIT_SHAPES + [(300, 16, 1003)])  # decode steps, batches, 10 row blocks
def test_split_kernel_margin_matches_fp64_and_torch_path(n, d, v):
    hidden, weight, targets = make(n, d, v)
    stats = assert_margin(hidden, weight, targets, "triton")
    torch_margin = exit_confidence(hidden, weight, targets, want_margin=True, backend="torch").margin
    torch.testing.assert_close(stats.margin, torch_margin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [50, 4099])  # many chunks with a ragged last one; a large batch
def test_torch_path_margin_over_row_chunks(monkeypatch, n):
    monkeypatch.setattr(ec, "CHUNK_BYTES", 4 * 1003 * (7 if n < 100 else 512))
    assert_margin(*make(n, 32, 1003))


@pytest.mark.parametrize("dtype", list(MARGIN_TOL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_error_per_dtype(backend, dtype):
    hidden, weight, _ = make(64, 64, 1000, dtype=dtype)
    exact = reference_margin(hidden, weight)
    own = (hidden @ weight.T).float().softmax(1).topk(2, 1).values  # PyTorch's own logits in dtype
    bound = MARGIN_TOL[dtype] or 2 * (own[:, 0] - own[:, 1] - exact).abs().max().item() + 1e-6
    margin = exit_confidence(hidden, weight, want_margin=True, backend=backend).margin
    assert (margin.double() - exact).abs().max() <= bound


def planted(n, d, v, top, runner_up, tie):
    """Integer inputs, so every logit is exact: row 0's largest logit |h0|^2 >= 9 (every unplanted
    class <= 6) at class `top` and, on a tie, at `runner_up` too, else 7/8 of it there."""
    hidden = torch.randint(-3, 4, (n, d)).float()
    hidden[0, 0] = 3
    weight = torch.randint(-1, 2, (v, d)).float() / 8
    weight[top] = hidden[0]
    weight[runner_up] = hidden[0] * (1 if tie else 7 / 8)
    return hidden, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", [True, False])
def test_margin_of_a_planted_top_two(backend, tie):
    hidden, weight = planted(5, 16, 77, 3, 70, tie)
    stats = assert_margin(hidden, weight, backend=backend, atol=1e-6)
    assert stats.pred[0] == 3 and (stats.margin[0] == 0 if tie else stats.margin[0] > 0)


# where the top two of row 0 lie for the split kernel: (top, runner-up) as functions of the plan
PLACES = {
    "same tile": lambda p: (p.split_v + 1, p.split_v + 3),
    "same split": lambda p: (p.split_v + 1, p.split_v + p.tiles.block_v + 2),
    "earlier split": lambda p: (2 * p.split_v + 5, 5),
    "later split": lambda p: (5, 5002),  # the ragged last split
    "later combine tile": lambda p: (5, ec.COMBINE_BLOCK_S * p.split_v + 1),
    "earlier combine tile": lambda p: (ec.COMBINE_BLOCK_S * p.split_v + 1, 5),
}


@NEEDS_TRITON
@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("tie", [True, False])
def test_split_kernel_merges_the_top_two(monkeypatch, place, tie):
    """A tie at the top gives margin 0 wherever its two classes lie; a runner-up in the top's
    own tile, split or in another split (or combine tile) is found."""
    if "combine" in place:
        monkeypatch.setattr(ec, "INTERPRET_SM_COUNT", 64)  # more splits than one combine tile
    n, d, v = 3, 16, 5003
    plan = split_plan(n, v)
    top, runner_up = PLACES[place](plan)
    assert plan.n_splits > (ec.COMBINE_BLOCK_S if "combine" in place else 1)
    hidden, weight = planted(n, d, v, top, runner_up, tie)
    stats = assert_margin(hidden, weight, backend="triton", atol=1e-6)
    assert stats.pred[0] == (min(top, runner_up) if tie else top)
    assert stats.margin[0] == 0 if tie else stats.margin[0] > 0


@pytest.mark.parametrize("backend,n", [("torch", 150), pytest.param("triton", 1, marks=NEEDS_TRITON),
                                       pytest.param("triton", 150, marks=NEEDS_TRITON)])
def test_margin_ties_everywhere(backend, n):
    hidden = torch.randint(-2, 3, (n, 8)).float()  # integer logits in [-32, 32] over 1003 classes
    weight = torch.randint(-2, 3, (1003, 8)).float()
    top2 = (hidden @ weight.T).topk(2, 1).values
    tied = top2[:, 0] == top2[:, 1]
    assert tied.any() and (n == 1 or not tied.all())
    margin = assert_margin(hidden, weight, backend=backend, atol=1e-6).margin
    assert torch.all(margin[tied] == 0) and torch.all(margin[~tied] > 0)


@pytest.mark.parametrize("backend,n", [("torch", 17), pytest.param("triton", 1, marks=NEEDS_TRITON),
                                       pytest.param("triton", 70, marks=NEEDS_TRITON)])
def test_margin_of_very_confident_rows(backend, n):
    hidden, weight, targets = make(n, 16, 1000, scale=300.0)  # logits in the thousands
    stats = assert_margin(hidden, weight, targets, backend, atol=1e-5)
    assert torch.isfinite(stats.margin).all() and stats.margin.max() > 0.999


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [1, 2])
def test_margin_of_one_and_two_classes(backend, v):
    hidden, weight, _ = make(37, 24, v)
    stats = assert_margin(hidden, weight, backend=backend)
    if v == 1:  # no runner-up: the margin is the top probability, 1
        assert torch.equal(stats.margin, torch.ones(37))
    else:  # p1 - p2 = |tanh((x1 - x2) / 2)|
        logits = hidden.double() @ weight.double().T
        torch.testing.assert_close(stats.margin.double(), ((logits[:, 0] - logits[:, 1]) / 2).tanh().abs(),
                                   atol=2e-5, rtol=1e-5)


BAD = [
    (lambda h, w, t: (h[0], w, t), ValueError, "hidden"),
    (lambda h, w, t: (h.long(), w, t), TypeError, "hidden"),
    (lambda h, w, t: ("not a tensor", w, t), TypeError, "hidden"),
    (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "hidden"),
    (lambda h, w, t: (h, w[:, :-1], t), ValueError, "weight"),
    (lambda h, w, t: (h, w[:0], t), ValueError, "weight"),
    (lambda h, w, t: (h, w.double(), t), TypeError, "weight"),
    (lambda h, w, t: (h, w, t[:-1]), ValueError, "targets"),
    (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
    (lambda h, w, t: (h, w, t.clone().fill_(77)), ValueError, "targets"),
    (lambda h, w, t: (h, w, t.clone().fill_(-5)), ValueError, "targets"),
]


@pytest.mark.parametrize("mutate,error,name", BAD)
def test_bad_input_names_the_argument(mutate, error, name):
    with pytest.raises(error, match=name):
        exit_confidence(*mutate(*make(8, 16, 77)))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        exit_confidence(*make(8, 16, 77), backend="cuda")


# one kind of bad input, one exception type, in both ops (kernels/checks.py)
SAME_KIND = {  # kind: (mutate (hidden, weight, targets), expected type, argument named)
    "hidden and weight dtypes differ": (lambda h, w, t: (h, w.double(), t), TypeError, "weight"),
    "hidden not floating point": (lambda h, w, t: (h.long(), w.long(), t), TypeError, "hidden"),
    "targets not integer": (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
    "targets of the wrong length": (lambda h, w, t: (h, w, t[:-1]), ValueError, "targets"),
    "weight of the wrong width": (lambda h, w, t: (h, w[:, :-1], t), ValueError, "weight"),
    "empty batch": (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "hidden"),
    "target out of range": (lambda h, w, t: (h, w, t.clone().fill_(77)), ValueError, "targets"),
}


@pytest.mark.parametrize("kind", list(SAME_KIND))
def test_same_bad_input_same_exception_in_both_ops(kind):
    mutate, error, name = SAME_KIND[kind]
    hidden, weight, targets = mutate(*make(8, 16, 77))
    with pytest.raises(error, match=name):
        exit_confidence(hidden, weight, targets)
    with pytest.raises(error, match=name):
        weighted_linear_cross_entropy([hidden], weight, targets, [1.0])


# ----------------------------------------------------------------------------- backends and arches
@NEEDS_TRITON
def test_triton_gemm_runs_the_triton_kernels():
    """exit_confidence computes its logit tiles inside its own kernel (no logits in memory, so no
    vendor-GEMM variant): backend='triton_gemm' gives 'triton''s results bit for bit."""
    hidden, weight, targets = make(19, 40, 77)
    ours = exit_confidence(hidden, weight, targets, want_margin=True, backend="triton_gemm")
    same = exit_confidence(hidden, weight, targets, want_margin=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(ours, same))
    assert_matches(ours, reference(hidden, weight, targets))


@NEEDS_TRITON
@pytest.mark.parametrize("capability, block_m, block_v", [((8, 0), 128, 64), ((8, 6), 128, 64), ((8, 9), 128, 64),
                                                          ((9, 0), 128, 128), ((10, 0), 64, 64), ((12, 0), 128, 64)])
def test_batch_tiles_per_gpu_generation(monkeypatch, capability, block_m, block_v):
    """Hopper takes 128-class tiles; every other generation, Blackwell's sm_100 and sm_120
    included, half of them, and sm_100 half the rows too (the AOT matrix checks that none spills)."""
    monkeypatch.setattr(ec, "interpreting", lambda: False)
    monkeypatch.setattr(ec, "cuda_capability", lambda device: capability)
    tiles = ec._tiles(4096, torch.bfloat16, torch.device("cpu"))
    assert (tiles.block_m, tiles.block_v) == (block_m, block_v)
    assert ec._tiles(8, torch.bfloat16, torch.device("cpu")) == ec.CUDA_DECODE_TILES  # decode: every arch
