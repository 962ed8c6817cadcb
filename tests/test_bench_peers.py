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

# rule -> the packages with a thunk for it, and whether the rule takes f
RULES = {
    "TrimmedMean": (("byzfl", "flwr", "numpy", "torch"), True),
    "CoordinateMedian": (("byzfl", "flwr", "numpy", "torch"), False),
    "Krum": (("byzfl", "flwr"), True),
    "GeometricMedian": (("byzfl",), False),
    "CenteredClipping": (("byzfl",), False),
    "Bulyan": (("flwr",), True),
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


def untied_coordinates(G, f):
    """The coordinates where Bulyan's beta nearest values to the median are unique: no two values
    equidistant from the median compete for the last place (Flower breaks that tie by
    np.argpartition's order, robustagg by the lower client index)."""
    agg = A.Bulyan(f)
    agg(G)
    picked, beta = G[agg.last_report.selected].double(), agg.last_report.beta
    if beta == picked.shape[0]:
        return torch.ones(G.shape[1], dtype=torch.bool)
    distance = (picked - picked.quantile(0.5, dim=0)).abs().sort(dim=0).values
    return distance[beta - 1] != distance[beta]


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
    expected = as_vector(rule.robustagg())
    keep = untied_coordinates(G, min(f, (n - 3) // 4)) if rule_name == "Bulyan" else slice(None)
    if rule_name == "Bulyan":
        assert keep.any(), "the test rows leave no untied coordinate to compare"
    for label, thunk in thunks.items():
        with np.errstate(divide="ignore"):   # ByzFL's clipping divides by a zero distance unguarded
            actual = as_vector(thunk())
        close(actual[keep], expected[keep], dtype)
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


def test_every_thunk_gives_the_same_result_when_called_again():
    # The bench calls each thunk many times: Flower's Bulyan pops from its input list and both
    # CenteredClippings keep their output as the next center, so a thunk must not carry state.
    for rule in peers.peer_rules(rows("ties_outlier", 12, torch.float64), 2):
        for label, thunk in {"robustagg": rule.robustagg, **rule.peers}.items():
            with np.errstate(divide="ignore"):
                first, again = as_vector(thunk()), as_vector(thunk())
            assert torch.equal(first, again), (rule.name, label)


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
