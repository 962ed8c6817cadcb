"""robustagg.bench.peers: every peer thunk computes what robustagg's aggregator computes on the same
G, so that ``bench --peers`` times like against like. The conventions mapped (ByzFL's Krum f,
Flower's trim proportion, the median of an even n, ...) are in the module's docstring."""
import importlib.metadata

import numpy as np
import pytest
import torch
from conftest import RESOLUTION

from robustagg import aggregators as A
from robustagg.bench import peers

# rule -> the packages with a thunk for it, and whether the rule takes f. CAF and SMEA are not here:
# ByzFL's are random approximations of the rule (peers' docstring), tested where the choice is
# unambiguous (test_smea_agrees_where_the_far_rows_are_unambiguous, test_caf_agrees_in_one_dimension_*).
RULES = {
    "TrimmedMean": (("byzfl", "flwr", "numpy", "torch"), True),
    "CoordinateMedian": (("byzfl", "flwr", "numpy", "torch"), False),
    "Krum": (("byzfl", "flwr"), True),
    "GeometricMedian": (("byzfl",), False),
    "CenteredClipping": (("byzfl",), False),
    "Bulyan": (("flwr",), True),
    "Meamed": (("byzfl",), True),
    "MDA": (("byzfl",), True),
    "MoNNA": (("byzfl",), True),
    "NNM": (("byzfl",), True),
    "ARC": (("byzfl",), True),
    "Bucketing": (("byzfl",), False),
}
CASES = [("random", torch.float64), ("ties_outlier", torch.float64), ("random", torch.float32)]
D = 64
OUTLIER = 1e30               # squared distances ~1e61: finite in float64
CONVERGED_STEPS = 100        # Weiszfeld steps after which both starts agree to 2e-16 on these rows


def rows(case, n, dtype, seed=0):
    """random: N(0.5, 1); ties_outlier: entries in {-1, 0, 1}, rows 1 and 3 copies of rows 0 and 2,
    and row n // 2 at 1e30 in every entry."""
    rng = np.random.default_rng(seed)
    if case == "random":
        X = rng.normal(0.5, 1.0, (n, D))
    else:
        X = rng.integers(-1, 2, (n, D)).astype(np.float64)
        X[1], X[3] = X[0], X[2]
        X[n // 2] = OUTLIER
    return torch.from_numpy(X).to(dtype)


def as_vector(result) -> torch.Tensor:
    """A thunk's result as a float64 [d] tensor: Flower returns a list of layers, ByzFL and numpy
    arrays or tensors."""
    if isinstance(result, list):
        result = np.concatenate([np.ravel(layer) for layer in result])
    return torch.as_tensor(result).double().reshape(-1)


def as_rows(result) -> torch.Tensor:
    """A thunk's result as a float64 [rows, d] tensor: one row for an aggregator, the (n', d)
    matrix of a pre-aggregator, so that each row is compared on its own scale (a far row's 1e30
    must not hide the others' errors)."""
    if isinstance(result, list):
        return as_vector(result)[None, :]
    result = torch.as_tensor(result).double()
    return result.reshape(-1, result.shape[-1])


def the_rule(rules, prefix):
    [rule] = [r for r in rules if r.name.split("(")[0] == prefix]
    return rule


def package_of(label):
    """The package a peer label names: "byzfl TrMean" -> byzfl, "torch.sort" -> torch."""
    return label.split()[0].split(".")[0]


def close(actual, expected, dtype):
    atol, rtol = RESOLUTION[dtype]
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def nearest_to_median_untied(values, k):
    """The coordinates where the k values nearest the median do not depend on a tie: the k-th
    distance from the median is not shared across the cut, or every value at that distance is the
    same value (Flower and ByzFL break such ties by np.argpartition's order, robustagg by the lower
    client index; med - t and med + t at the last place give different means)."""
    distance = (values - values.quantile(0.5, dim=0)).abs()
    last = distance.sort(dim=0).values[k - 1]
    at_last = distance == last
    same_value = (torch.where(at_last, values, torch.inf).amin(dim=0)
                  == torch.where(at_last, values, -torch.inf).amax(dim=0))
    return ((distance <= last).sum(dim=0) == k) | same_value


def untied_coordinates(rule_name, G, f):
    """Where the result does not depend on a tie: Bulyan's beta nearest values among the rows it
    picked, Meamed's n - f nearest values; everywhere for the other rules."""
    if rule_name == "Bulyan":
        agg = A.Bulyan(min(f, (G.shape[0] - 3) // 4))
        agg(G)
        return nearest_to_median_untied(G[agg.last_report.selected].double(), agg.last_report.beta)
    if rule_name == "Meamed":
        return nearest_to_median_untied(G.double(), G.shape[0] - f)
    return torch.ones(G.shape[1], dtype=torch.bool)


def matrix_params():
    params = []
    for rule, (packages, takes_f) in RULES.items():
        for package in packages:
            for f in ((0, 2, None) if takes_f else (2,)):
                for n in (12, 13):
                    for case, dtype in CASES:
                        label = f"{rule}-{package}-f{'max' if f is None else f}-n{n}-{case}-{dtype}"
                        params.append(pytest.param(rule, package, f, n, case, dtype,
                                                   id=label.replace("torch.", "")))
    return params


@pytest.mark.parametrize("rule_name,package,f,n,case,dtype", matrix_params())
def test_peer_computes_what_robustagg_computes(monkeypatch, rule_name, package, f, n, case, dtype):
    if peers.peer_versions()[package] is None:
        pytest.skip(f"{package} is not installed, so peer_rules has no {package} thunk")
    f = (n - 3) // 2 if f is None else f   # None: the largest f Krum allows
    # Both Weiszfeld runs to their common fixed point; the default step count is tested below.
    monkeypatch.setattr(peers, "GEOMETRIC_MEDIAN_STEPS", CONVERGED_STEPS)
    G = rows(case, n, dtype)
    rule = the_rule(peers.peer_rules(G, f), rule_name)
    thunks = {label: thunk for label, thunk in rule.peers.items() if package_of(label) == package}
    assert thunks, f"{rule.name} has no {package} thunk: {sorted(rule.peers)}"
    expected = as_rows(rule.robustagg())
    keep = untied_coordinates(rule_name, G, f)
    assert keep.any(), "the test rows leave no untied coordinate to compare"
    for label, thunk in thunks.items():
        with np.errstate(divide="ignore"):   # ByzFL's clipping divides by a zero distance unguarded
            actual = as_rows(thunk())
        assert actual.shape == expected.shape, label
        for actual_row, expected_row in zip(actual, expected):
            close(actual_row[keep], expected_row[keep], dtype)
    assert rule.bytes_read == G.numel() * G.element_size()


def test_krum_peers_count_the_same_neighbours():
    # 1-D points -5, -4.9, 3, 4, 5 and f = 1. With the 2 nearest others (Blanchard et al.) the scores
    # are 64.01, 62.42, 5, 2, 5: 4 wins. With 3 (ByzFL's Krum(1), which counts the point itself among
    # its n - f) they are 145.01, 141.63, 67.41, 81.21, 103.01: 3 would win. So the mapped f matters.
    G = torch.tensor([[-5.0], [-4.9], [3.0], [4.0], [5.0]], dtype=torch.float64)
    rule = the_rule(peers.peer_rules(G, 1), "Krum")
    assert as_vector(rule.robustagg()).tolist() == [4.0]
    assert rule.peers, "neither ByzFL nor Flower is installed"
    for label, thunk in rule.peers.items():
        assert as_vector(thunk()).tolist() == [4.0], label


@pytest.mark.parametrize("n,label", [(12, "torch.kthvalue (mean of the two middles)"), (13, "torch.median")])
def test_torch_median_thunk_says_which_convention(n, label):
    # torch.median is the lower middle for even n; numpy's median (robustagg's) is the mean of the two.
    rule = the_rule(peers.peer_rules(rows("random", n, torch.float64), 2), "CoordinateMedian")
    assert label in rule.peers


def test_flower_trim_proportion_is_exact_where_f_over_n_rounds_down():
    # Flower cuts int(proportiontocut * n) values at each end; 1 / 49 * 49 rounds to just below 1.
    assert int(1 / 49 * 49) == 0
    if peers.peer_versions()["flwr"] is None:
        pytest.skip("flwr is not installed")
    G = rows("random", 49, torch.float64)
    rule = the_rule(peers.peer_rules(G, 1), "TrimmedMean")
    close(as_vector(rule.peers["flwr aggregate_trimmed_avg"]()), as_vector(rule.robustagg()), torch.float64)


def test_geometric_median_default_steps_agree_on_spread_out_rows():
    # At the benchmark's step count the two starts (ByzFL 0, robustagg the mean) still differ by the
    # iteration's transient; on spread-out rows it has decayed (measured 1e-12 here, 4e-16 at
    # n = 50, d = 1e6).
    if peers.peer_versions()["byzfl"] is None:
        pytest.skip("byzfl is not installed")
    G = torch.from_numpy(np.random.default_rng(0).normal(0.5, 1.0, (12, 4096)))
    rule = the_rule(peers.peer_rules(G, 2), "GeometricMedian")
    assert rule.name == f"GeometricMedian(nu=1e-06, steps={peers.GEOMETRIC_MEDIAN_STEPS})"
    expected = as_vector(rule.robustagg())
    torch.testing.assert_close(as_vector(rule.peers["byzfl GeometricMedian"]()), expected,
                               atol=1e-9 * float(expected.abs().max()), rtol=0.0)


# ByzFL's CAF and SMEA start their power-method step from numpy's or torch's global RNG, so two calls
# may differ by design; seeding that RNG inside the thunk would change the caller's global state.
# (ByzFL's CAF on a 1e30 row would also loop for a very long time: peers' docstring.)
RANDOM_PEERS = {"byzfl CAF", "byzfl SMEA"}


def test_every_thunk_gives_the_same_result_when_called_again():
    # The bench calls each thunk many times: Flower's Bulyan pops from its input list, both
    # CenteredClippings keep their output as the next center, ByzFL's ARC clips its input in place
    # and Bucketing draws a permutation, so a thunk must not carry state.
    G = rows("ties_outlier", 12, torch.float64)
    before = G.clone()
    for rule in peers.peer_rules(G, 2):
        for label, thunk in {"robustagg": rule.robustagg, **rule.peers}.items():
            if label in RANDOM_PEERS:
                continue
            with np.errstate(divide="ignore"):
                first, again = as_vector(thunk()), as_vector(thunk())
            assert torch.equal(first, again), (rule.name, label)
            assert torch.equal(G, before), (rule.name, label)


def byzfl_rule(G, f, prefix):
    """The rule named prefix from peer_rules(G, f), or a skip without ByzFL."""
    if peers.peer_versions()["byzfl"] is None:
        pytest.skip("byzfl is not installed")
    return the_rule(peers.peer_rules(G, f), prefix)


def far_rows(n, far, dtype, far_at, seed=0):
    """N(0, 1) rows with rows far_at .. far_at + far - 1 moved to +1e3 in every entry."""
    X = np.random.default_rng(seed).normal(0.0, 1.0, (n, D))
    X[far_at:far_at + far] += 1e3
    return torch.from_numpy(X).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,far_at", [(12, 0), (12, 6), (13, 12)])
def test_smea_agrees_where_the_far_rows_are_unambiguous(n, far_at, dtype):
    # ByzFL's eigenvalue of a subset is one power step from a random start, an underestimate; a
    # subset holding the row at +1e3 has a top eigenvalue near 1e6 d / n, its one step about that
    # over sqrt(d), still far above the honest subset's (about 1 + d / n). So the honest subset
    # wins whatever the start, in both, and the means agree. Several calls: several starts.
    G = far_rows(n, peers.SMEA_F, dtype, far_at)
    rule = byzfl_rule(G, 2, "SMEA")
    assert rule.name == f"SMEA(f={peers.SMEA_F})"
    expected = as_vector(rule.robustagg())
    honest = torch.cat([G[:far_at], G[far_at + peers.SMEA_F:]]).double().mean(dim=0)
    close(expected, honest, dtype)
    for _ in range(3):
        close(as_vector(rule.peers["byzfl SMEA"]()), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("far_at", [0, 4])
def test_caf_agrees_in_one_dimension_where_both_loops_stop_together(far_at, dtype):
    # ByzFL's CAF differs in its power step (exact only in d = 1) and in taking tau_max over every
    # client, those at weight 0 too (a far row stays the farthest and the loop crawls), so it is
    # compared in d = 1 on rows where both loops stop after the same iterations. 0, 1, 2, 3 and
    # 5 (f = 1, the loop runs while the weights sum to more than n - 2f = 3): iteration 1 (mean
    # 2.2, tau 4.84, 1.44, 0.04, 0.64, 7.84) puts 5 at weight 0 and the sum at 3.11. Iteration 2
    # (eigenvalue 1.00, below the first's 2.96): ByzFL divides by 5's tau (10.32), ours by 0's
    # (3.19); either way the sum falls to at most 2.81 and the loop stops. So both return
    # iteration 2's weighted mean, 1.787, with 5 left out.
    values = [0.0, 1.0, 2.0, 3.0]
    values.insert(far_at, 5.0)
    G = torch.tensor(values, dtype=dtype)[:, None]
    rule = byzfl_rule(G, 1, "CAF")
    expected = as_vector(rule.robustagg())
    close(expected, torch.tensor([1.7868852459016393], dtype=torch.float64), dtype)
    close(as_vector(rule.peers["byzfl CAF"]()), expected, dtype)


def test_caf_is_left_out_at_f_zero():
    # ByzFL's CAF(0) never enters its loop and returns None (robustagg's CAF(0) is the mean), so
    # CAF has no peer there and no rule; the other ByzFL rules stay.
    if peers.peer_versions()["byzfl"] is None:
        pytest.skip("byzfl is not installed")
    names = [rule.name for rule in peers.peer_rules(rows("random", 12, torch.float64), 0)]
    assert "CAF(f=0)" not in names and "Meamed(f=0)" in names


def test_bucketing_thunk_leaves_the_global_rngs_as_they_were():
    # ByzFL draws Bucketing's permutation from numpy's global RNG (torch's on a tensor); the thunk
    # hands it robustagg's permutation instead, and must leave those RNGs and ByzFL as it found them.
    for dtype in (torch.float64, torch.float32):
        rule = byzfl_rule(rows("random", 13, dtype), 2, "Bucketing")
        numpy_state, torch_state = np.random.get_state(), torch.get_rng_state()
        module = peers.sys.modules[peers.byzfl_module("aggregators").Bucketing.__module__]
        random_tool = module.random_tool
        close(as_rows(rule.peers["byzfl Bucketing"]()).reshape(-1), as_vector(rule.robustagg()), dtype)
        assert module.random_tool is random_tool
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
        assert torch.equal(torch.get_rng_state(), torch_state)


def test_arc_is_left_out_where_byzfl_clip_count_rounds_down():
    # n = 242, f = 33: 2 * 33 * 209 / 242 = 57 exactly; ByzFL's float product rounds to 56.
    n, f = 242, 33
    assert int((2 * f / n) * (n - f)) == 56 and 2 * f * (n - f) // n == 57
    if peers.peer_versions()["byzfl"] is None:
        pytest.skip("byzfl is not installed")
    names = [rule.name for rule in peers.peer_rules(torch.zeros(n, 2, dtype=torch.float64), f)]
    assert f"ARC(f={f})" not in names and f"NNM(f={f})" in names


@pytest.mark.parametrize("n", [20, 50])
def test_new_rules_run_at_the_cli_f(n):
    # The bench calls peer_rules(G, n // 5): MDA and SMEA keep their small f, the others take f.
    f = n // 5
    rules = {rule.name: rule for rule in peers.peer_rules(rows("random", n, torch.float32), f)}
    names = [f"Meamed(f={f})", f"MDA(f={peers.MDA_F})", f"MoNNA(f={f}, idx=0)", f"CAF(f={f})",
             f"SMEA(f={peers.SMEA_F})", f"NNM(f={f})", f"ARC(f={f})", f"Bucketing(s={peers.BUCKET_SIZE})"]
    if peers.peer_versions()["byzfl"] is None:
        assert not set(names) & set(rules)
        return
    for name in names:
        assert torch.isfinite(as_rows(rules[name].robustagg())).all(), name


def test_a_missing_package_drops_its_thunks_and_rules_left_without_peers(monkeypatch):
    monkeypatch.setattr(peers, "byzfl_module", lambda name: None)
    monkeypatch.setattr(peers, "_flower_aggregate", lambda: None)
    rules = peers.peer_rules(rows("random", 12, torch.float64), 2)
    assert [r.name for r in rules] == ["TrimmedMean(f=2)", "CoordinateMedian"]
    assert {package_of(label) for r in rules for label in r.peers} == {"numpy", "torch"}


def test_bfloat16_has_no_numpy_or_flower_thunks():
    # numpy has no bfloat16; ByzFL then takes the tensor (its torch path computes in float32).
    rules = peers.peer_rules(rows("random", 12, torch.bfloat16), 2)
    assert {package_of(label) for r in rules for label in r.peers} <= {"byzfl", "torch"}


@pytest.mark.parametrize("f", [-1, 5, 2.0, True])
def test_f_out_of_range_names_f_and_n(f):
    with pytest.raises(ValueError, match=rf"f={f!r} is out of range for n=12"):
        peers.peer_rules(rows("random", 12, torch.float64), f)


def test_peer_versions_are_the_installed_versions():
    versions = peers.peer_versions()
    assert set(versions) == {"byzfl", "flwr", "numpy", "torch"}
    assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__
    for package in ("byzfl", "flwr"):
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        assert versions[package] == installed, package


def test_peer_versions_reports_none_for_a_missing_package(monkeypatch):
    monkeypatch.setattr(peers, "PACKAGES", ("torch", "robustagg-no-such-package"))
    assert peers.peer_versions() == {"torch": torch.__version__, "robustagg-no-such-package": None}
