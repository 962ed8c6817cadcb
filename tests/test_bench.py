"""python -m robustagg bench: every op and aggregator gets a reference row and a backend row, the
floor is the fastest plain read, and noisy measurements are flagged instead of reported."""
import ctypes
import json

import numpy as np
import pytest
import torch

from robustagg.bench import cli
from robustagg.layout import Layout
from robustagg.bench.models import EXPECTED_D, model_layout
from robustagg.bench.timing import Floor, Timer, Timing, format_seconds


def test_model_presets_have_their_parameter_counts():
    for name, d in EXPECTED_D.items():
        assert model_layout(name).d == d, name


def test_bench_writes_a_row_per_case_and_backend(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["--model", "mlp-phishing", "--n", "8", "--repeats", "1", "--aggregators",
                     "--aggregator-n", "10", "--json", str(out), "--csv", str(tmp_path / "b.csv"),
                     "--plot", str(tmp_path / "b.png")]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["d"] == 39_426 and result["meta"]["torch"] == torch.__version__
    rows = result["rows"]
    ops = {r["case"] for r in rows if r["section"] == "ops"}
    assert {"sign_sum", "median", "pairwise_sqdist", "maxpool_amplify(kernel=2)", "topk_ef_step(k=1%)"} <= ops
    for case in ops:
        backends = {r["backend"] for r in rows if r["case"] == case}
        assert "torch-ref" in backends and "cpu" in backends, (case, backends)
    assert any(r["backend"] == "G @ G.T" for r in rows if r["case"] == "pairwise_sqdist")
    aggregators = [r for r in rows if r["section"] == "aggregators"]
    names = {r["case"] for r in aggregators}
    assert {"FedAvg", "Krum", "Bulyan", "SignGuard", "SparseFed", "CosDen", "FLTrust"} <= names
    assert all(r["ms_min"] <= r["ms"] <= r["ms_max"] and r["floor_ms"] > 0 and r["calls"] >= 1 for r in rows)
    assert {r["backend"] for r in aggregators} == {"torch-ref", "auto"}
    fedavg = [r for r in aggregators if r["case"] == "FedAvg"]
    assert all(r["x_fedavg"] == pytest.approx(1.0) for r in fedavg)
    krum = next(r for r in aggregators if r["case"] == "Krum" and r["backend"] == "auto")
    fedavg_auto = next(r for r in fedavg if r["backend"] == "auto")
    assert krum["x_fedavg"] == pytest.approx(krum["ms"] / fedavg_auto["ms"])
    assert (tmp_path / "b.png").stat().st_size > 0
    assert set(result["meta"]["floor_passes"]) <= {"G.sum()", "stream_read"}


def test_ops_with_no_value_skips_the_ops(tmp_path, capsys):
    assert cli.main(["--model", "mlp-phishing", "--ops"]) == 2
    assert "nothing to time" in capsys.readouterr().err
    out = tmp_path / "bench.json"
    assert cli.main(["--model", "mlp-phishing", "--ops", "--aggregators", "--aggregator-n", "10", "--repeats", "1",
                     "--json", str(out)]) == 0
    assert {r["section"] for r in json.loads(out.read_text())["rows"]} == {"aggregators"}


@pytest.mark.parametrize("model, d", [(["--d", "3000"], 3000), (["--shapes", "4x3x3x3,10x20,7"], 108 + 200 + 7)])
def test_custom_models_by_d_or_shapes(tmp_path, model, d):
    out = tmp_path / "bench.json"
    assert cli.main([*model, "--n", "6", "--ops", "sign_sum", "maxpool", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["d"] == d
    assert {r["case"] for r in result["rows"]} == {"sign_sum", "maxpool_amplify(kernel=2)"}
    assert {r["d"] for r in result["rows"]} == {d}


@pytest.mark.parametrize("bad", ["", "4x0", "4xx3", "a,b"])
def test_bad_shapes_name_the_argument(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--shapes", bad])
    assert "--shapes" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_a_budget_that_is_not_a_positive_time_names_the_argument(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--budget", bad])
    err = capsys.readouterr().err
    assert "--budget" in err and "> 0" in err


def test_threads_sets_torch_and_the_kernels(tmp_path):
    before = torch.get_num_threads()
    try:
        assert cli.main(["--d", "2000", "--n", "4", "--ops", "sign_sum", "--repeats", "1", "--threads", "1",
                         "--json", str(tmp_path / "b.json")]) == 0
        assert torch.get_num_threads() == 1
        # the kernels' OpenMP runtime (soname libgomp.so.1) is torch's: one in the process, set to 1
        # thread (scikit-learn brings its own under another soname)
        with open("/proc/self/maps") as f:
            gomp = {line.split()[-1] for line in f if line.rstrip().endswith("/libgomp.so.1")}
        assert len(gomp) == 1, gomp
        assert ctypes.CDLL(gomp.pop()).omp_get_max_threads() == 1
        assert "(1 threads)" in json.loads((tmp_path / "b.json").read_text())["meta"]["device"]
    finally:
        cli._set_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("section, n", [("ops", 8), ("aggregators", 10), ("peers", 20)])
def test_the_progress_total_is_the_number_of_cases_timed(section, n, dtype):
    layout = model_layout("mlp-phishing")
    d = layout.d
    G = torch.randn(n, d).to(dtype)
    assert cli._item_count(section, n, d, dtype, layout, None) == len(cli._section_items(section, G, layout, None))
    assert cli._item_count("ops", n, d, dtype, layout, ["sign_sum"]) == 1


def test_stream_read_reads_every_byte():
    x = torch.arange(1001, dtype=torch.float32) * 1.5
    for view in (x, x[1:], x[3:998]):   # word-aligned and not, with a ragged tail
        raw = view.numpy().view(np.uint8)
        head = (-view.data_ptr()) % 8
        count = (len(raw) - head) // 8
        body = raw[head:head + 8 * count].view(np.uint64).sum(dtype=np.uint64)
        rest = int(raw[:head].sum()) + int(raw[head + 8 * count:].sum())
        expected = (int(body) + rest) % (1 << 64)
        got = int(torch.ops.robustagg_bench.stream_read(view)) % (1 << 64)
        assert got == expected
    with pytest.raises(RuntimeError, match="stream_read: x must be contiguous"):
        torch.ops.robustagg_bench.stream_read(torch.ones(8, 8).T)


def test_the_floor_is_the_best_of_the_plain_reads_and_flags_an_implausible_one():
    timer = Timer(torch.device("cpu"), repeats=2, budget_s=0.5)
    G = torch.randn(64, 4096)
    floor = timer.floor(G)
    assert floor.what in ("G.sum()", "stream_read") and floor.plausible and floor.bandwidth > 0
    # as if an earlier floor had been far faster; 1e4x, because on a loaded machine the second
    # floor alone can come out 20x faster than the first (100x made this test flaky)
    timer.best_bandwidth = 1e4 * floor.bandwidth
    assert not timer.floor(G).plausible


def test_a_new_output_matrix_costs_a_clone_per_byte():
    timer = Timer(torch.device("cpu"), repeats=2, budget_s=0.5)
    G = torch.randn(64, 4096)
    nbytes = G.numel() * G.element_size()
    assert timer.floor(G).clone_bandwidth is None
    floor = timer.floor(G, writes=True)
    assert floor.clone_bandwidth > 0
    # clip_rows: a read for the norms, then a read that writes the clipped copy
    assert floor.seconds(2 * nbytes, nbytes) == pytest.approx(nbytes / floor.bandwidth + nbytes / floor.clone_bandwidth)
    assert floor.seconds(nbytes) == pytest.approx(nbytes / floor.bandwidth)


def test_noisy_rows_say_why():
    clean, spread = Timing(1.0, 0.9, 1.1, 5), Timing(1.0, 0.5, 2.0, 5)
    good, bad = Floor(1e10, "G.sum()", True, None), Floor(1e8, "G.sum()", False, None)
    assert cli._noise(clean, good, 1.3) == ""
    assert "1.5x" in cli._noise(spread, good, 1.3)
    assert "faster than the floor" in cli._noise(clean, good, 0.8)
    assert "20%" in cli._noise(clean, bad, 1.3)
    assert not Timing(1.0, 0.5, 2.0, 2).noisy   # two calls are too few to call a spread


def test_a_call_slower_than_the_budget_is_timed_once():
    timer = Timer(torch.device("cpu"), repeats=5, budget_s=0.0)
    calls = []
    timing = timer.measure(lambda: calls.append(1))
    assert timing.calls == 1 and len(calls) == 1 and timing.min == timing.median == timing.max


def test_times_print_in_a_unit_that_suits_them():
    assert format_seconds(2.5) == "2.5 s"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(0.000853) == "853 us"
    assert format_seconds(4.2e-6) == "4.2 us"
    assert format_seconds(0.1234) == "123 ms"


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory"),
    # what torch's host allocator raised for ByzFL's NNM at ResNet-18 size, n = 50
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 89391696000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError("Unable to allocate 83.3 GiB for an array"),
], ids=["gpu", "host-torch", "host-numpy"])
def test_a_case_that_runs_out_of_memory_is_skipped_and_noted(error):
    timer = Timer(torch.device("cpu"), repeats=1)

    def out_of_memory():
        raise error

    skipped = []
    assert cli._measure_or_none(timer, out_of_memory, "peers NNM(f=10) n=50 [byzfl NNM]", skipped) is None
    assert skipped == ["peers NNM(f=10) n=50 [byzfl NNM]: out of memory"]
    assert cli._measure_or_none(timer, lambda: None, "ops median n=100 [cpu]", skipped).median > 0
    assert len(skipped) == 1


def test_any_other_error_of_a_case_still_stops_the_run():
    def broken():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli._measure_or_none(Timer(torch.device("cpu"), repeats=1), broken, "ops median n=20 [cpu]", [])


def test_rules_selects_aggregators_and_peer_rules_by_substring():
    layout = Layout.from_shapes([(64,)])
    G = torch.randn(20, 64)
    aggregators = cli._section_items("aggregators", G, layout, None, ["Krum"])
    assert sorted(c.name for c in aggregators) == ["Bucketing+Krum", "Krum", "MultiKrum", "MultiKrumCos"]
    peer_names = [r.name for r in cli._section_items("peers", G, layout, None, ["Meamed", "MDA"])]
    assert all(name.startswith(("Meamed", "MDA")) for name in peer_names)
    assert cli._item_count("aggregators", 20, 64, torch.float32, layout, None, ["Krum"]) == 4
    assert cli.main(["--d", "64", "--ops", "--aggregators", "--aggregator-n", "20", "--rules", "NoSuchRule",
                     "--repeats", "1"]) == 0
