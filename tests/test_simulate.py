"""``python -m robustagg simulate``: the stacked client training against one client at a time,
the backdoor, the claims' judgement on made-up runs, and a tiny federation (10 clients, 8 rounds,
3 seeds) whose JSON must have the documented schema and in which RobustLR must cut FedAvg's
backdoor success rate in half and every robustagg aggregator must survive a NaN client."""
import json

import pytest
import torch

from robustagg import simulation as sim
from robustagg.simulate import claims, cli, experiment

TINY = experiment.Config("tiny", ("FedAvg", "RobustLR", "NaiveMean"), ("none", "backdoor", "nan_inject"), rounds=8,
                         seeds=(0, 1, 2), clients=10, byzantine=2)


@pytest.fixture(scope="module")
def data():
    return sim.load_digits_split()


@pytest.fixture(scope="module")
def tiny():
    runs = experiment.run_all(TINY, jobs=1)
    return experiment.document(TINY, runs, jobs=1)


# ---------------------------------------------------------------- training and the backdoor

def test_batch_indices_are_a_stream_of_epochs():
    batches = sim.batch_indices(5, steps=4, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert batches.shape == (4, 3)
    stream = batches.flatten()
    assert sorted(stream[:5].tolist()) == list(range(5)) and sorted(stream[5:10].tolist()) == list(range(5))


def test_train_clients_matches_local_sgd_client_by_client(data):
    parts = sim.dirichlet_split(data.y_train, 4, alpha=1.0, seed=1)
    model = sim.make_model(3)
    start = sim.snapshot(model)
    stacked = sim.train_clients(start, data.x_train, data.y_train, parts, 6, 16, 0.2, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    for part, state in zip(parts, stacked):
        alone = sim.local_sgd(model, start, data.x_train[part], data.y_train[part], 6, 16, 0.2, generator)
        assert alone.keys() == state.keys()
        for key in alone:
            assert alone[key].dtype == state[key].dtype
            torch.testing.assert_close(state[key], alone[key], rtol=1e-5, atol=1e-6, msg=key)


def test_backdoor_stamps_and_relabels_the_chosen_fraction(data):
    backdoor = sim.Backdoor(target=3, poison_frac=0.5)
    parts = sim.dirichlet_split(data.y_train, 5, alpha=1.0, seed=0)
    x, y, poisoned = backdoor.poison(data, parts, [1, 4], torch.Generator().manual_seed(0))
    size = data.x_train.shape[0]
    for i in range(5):
        copies = poisoned[i][poisoned[i] >= size]
        assert copies.numel() == (round(0.5 * parts[i].numel()) if i in (1, 4) else 0)
        assert bool((y[copies] == 3).all()) and bool((x[copies][..., :2, :2] == 1).all())
        untouched = poisoned[i][poisoned[i] < size]
        assert set(untouched.tolist()) <= set(parts[i].tolist())
    assert backdoor.boost_for(20, 4) == 5.0 and sim.Backdoor(boost=2.0).boost_for(20, 4) == 2.0


@pytest.mark.parametrize("field, value", [("target", 10), ("poison_frac", 1.5), ("boost", 0.0), ("patch", 0)])
def test_backdoor_rejects_bad_settings(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        sim.Backdoor(**{field: value})


def test_a_nan_model_classifies_nothing(data):
    state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
             for k, v in sim.snapshot(sim.make_model()).items()}
    assert sim.accuracy(sim.make_model(), state, data.x_test, data.y_test) == 0.0


def test_a_round_whose_rule_raises_keeps_the_model(data):
    # four NaN clients of 20 leave 16, and Bulyan with f = 4 needs 19
    history = sim.run(sim.default_aggregators(20, 4)["Bulyan"](), rounds=1, byzantine=[0, 1, 2, 3],
                      attack="nan_inject", data=data)
    assert "Bulyan: f=4 is too large for n=16" in history.errors[0] and history.reports == [None]
    assert history.accuracy[0] == sim.accuracy(sim.make_model(0), sim.snapshot(sim.make_model(0)), data.x_test,
                                               data.y_test)


def test_the_same_seed_gives_the_same_numbers(data):
    config = experiment.Config("t", ("SignGuard",), ("gaussian",), rounds=2, seeds=(4,), clients=8, byzantine=2)
    first, second = (experiment.run_one(config, "SignGuard", "gaussian", 4, data) for _ in range(2))
    strip = (lambda run: [{k: v for k, v in r.items() if k != "agg_ms"} for r in run["rounds"]])
    assert strip(first) == strip(second)


# ---------------------------------------------------------------- the claims on made-up runs

def _run(aggregator, attack, accuracy, asr=0.0, byzantine_selected=None, seed=0):
    return {"aggregator": aggregator, "attack": attack, "seed": seed, "final_accuracy": accuracy, "final_asr": asr,
            "rounds": [{"round": 1, "accuracy": accuracy, "asr": asr, "byzantine_selected": byzantine_selected,
                        "agg_ms": 1.0}]}


def _claim(found, start):
    matching = [c for c in found if c["claim"].startswith(start)]
    assert len(matching) == 1, [c["claim"] for c in found]
    return matching[0]


def test_claims_use_the_median_over_seeds_and_can_fail():
    runs = [_run("FedAvg", "none", 0.95), _run("FedAvg", "backdoor", 0.9, asr=0.9),
            _run("RobustLR", "none", 0.94), *[_run("RobustLR", "backdoor", 0.9, asr=a, seed=s)
                                               for s, a in enumerate((0.1, 0.6, 0.3))]]
    assert _claim(claims.judge(runs), "RobustLR")["holds"]                 # median 0.3 <= 0.45
    runs[-1]["final_asr"] = 0.7                                            # median 0.6 > 0.45
    assert not _claim(claims.judge(runs), "RobustLR")["holds"]
    runs[2]["final_accuracy"] = 0.85                                       # 10 points below FedAvg
    runs[-1]["final_asr"] = 0.0
    assert not _claim(claims.judge(runs), "RobustLR")["holds"]


def test_the_nan_claim_needs_every_aggregator_and_a_destroyed_naive_mean():
    runs = [_run(a, attack, 0.9) for a in ("FedAvg", "Krum") for attack in ("none", "nan_inject")]
    runs += [_run("NaiveMean", "none", 0.9), _run("NaiveMean", "nan_inject", 0.0)]
    assert _claim(claims.judge(runs), "With a NaN client")["holds"]
    runs[3]["final_accuracy"] = 0.85                                       # Krum loses 5 points
    assert not _claim(claims.judge(runs), "With a NaN client")["holds"]
    runs[3]["final_accuracy"] = 0.9
    runs[-1]["final_accuracy"] = 0.5                                       # the naive mean survives
    assert not _claim(claims.judge(runs), "With a NaN client")["holds"]


def test_the_amplifier_claim_counts_byzantine_selections():
    runs = [_run("CosDen", "none", 0.9, byzantine_selected=0), _run("CosDen-noamp", "none", 0.9, byzantine_selected=0),
            _run("CosDen", "lie", 0.9, byzantine_selected=1), _run("CosDen-noamp", "lie", 0.9, byzantine_selected=2)]
    assert _claim(claims.judge(runs), "CosDen")["holds"]
    runs[2]["rounds"][0]["byzantine_selected"] = 3
    assert not _claim(claims.judge(runs), "CosDen")["holds"]


def test_claims_without_their_runs_are_left_out():
    assert claims.judge([_run("Krum", "lie", 0.9)]) == []


# ---------------------------------------------------------------- the tiny federation

def test_the_json_has_the_documented_schema(tiny):
    doc = json.loads(json.dumps(tiny))
    meta = doc["meta"]
    assert meta["preset"] == "tiny" and meta["dataset"] == "digits"
    assert (meta["clients"], meta["byzantine"], meta["rounds"], meta["seeds"]) == (10, 2, 8, [0, 1, 2])
    assert isinstance(meta["alpha"], float) and isinstance(meta["device"], str)
    assert meta["commit"] is None or isinstance(meta["commit"], str)
    assert len(doc["runs"]) == 3 * 3 * 3
    for run in doc["runs"]:
        assert run["aggregator"] in TINY.aggregators and run["attack"] in TINY.attacks and run["seed"] in TINY.seeds
        assert [r["round"] for r in run["rounds"]] == list(range(1, 9))
        for r in run["rounds"]:
            assert isinstance(r["accuracy"], float) and 0 <= r["accuracy"] <= 1
            assert r["asr"] is None or 0 <= r["asr"] <= 1
            assert r["byzantine_selected"] is None or 0 <= r["byzantine_selected"] <= (run["attack"] != "none") * 2
            assert isinstance(r["agg_ms"], float) and r["agg_ms"] >= 0
        assert run["final_accuracy"] == run["rounds"][-1]["accuracy"] and run["final_asr"] == run["rounds"][-1]["asr"]
    for c in doc["claims"]:
        assert set(c) == {"claim", "seed_paper", "holds", "evidence"}
        assert isinstance(c["claim"], str) and isinstance(c["seed_paper"], str) and isinstance(c["holds"], bool)
        assert isinstance(c["evidence"], str) and c["evidence"]


def test_tiny_federation_robustlr_halves_the_backdoor_and_nan_is_survived(tiny):
    found = tiny["claims"]
    assert _claim(found, "The backdoor is real")["holds"], found
    assert _claim(found, "RobustLR cuts")["holds"], found
    assert _claim(found, "With a NaN client")["holds"], found
    for run in tiny["runs"]:
        if run["attack"] == "nan_inject" and run["aggregator"] != "NaiveMean":
            assert all(r["rejected_nonfinite"] == run["byzantine"] for r in run["rounds"])


def test_a_federation_without_byzantine_clients_runs_every_attack_as_the_baseline(data):
    config = experiment.Config("t", ("FedAvg",), ("none", "backdoor", "lie"), rounds=1, seeds=(0,), clients=8,
                               byzantine=0)
    runs = [experiment.run_one(config, "FedAvg", attack, 0, data) for attack in config.attacks]
    assert all(run["byzantine"] == [] for run in runs)
    assert len({run["final_accuracy"] for run in runs}) == 1
    assert experiment.document(config, runs, jobs=1)["meta"]["backdoor"]["boost"] is None


def test_the_command_writes_json_and_plot_on_two_processes(tmp_path, data):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert cli.main(["--aggregators", "Krum,FedAvg", "--attacks", "lie", "--rounds", "2", "--clients", "8",
                     "--byzantine", "2", "--seeds", "0", "--jobs", "2", "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["aggregator"], r["attack"]) for r in doc["runs"]] == [("Krum", "lie"), ("FedAvg", "lie")]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = experiment.Config("t", ("Krum",), ("lie",), rounds=2, seeds=(0,), clients=8, byzantine=2)
    alone = experiment.run_one(config, "Krum", "lie", 0, data)
    assert [r["accuracy"] for r in alone["rounds"]] == [r["accuracy"] for r in doc["runs"][0]["rounds"]]


@pytest.mark.parametrize("argv, message", [(["--aggregators", "Kram"], "Kram"), (["--attacks", "lie,nope"], "nope"),
                                            (["--rounds", "0"], "0 must be > 0"), (["--seeds", "a"], "seeds"),
                                            (["--byzantine", "20"], "--byzantine 20"),
                                            (["--clients", "200", "--byzantine", "4", "--aggregators", "FedAvg",
                                              "--attacks", "none", "--seeds", "0", "--jobs", "1"], "clients=200")])
def test_bad_arguments_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
