"""python -m robustagg bench: every op and aggregator gets a reference row and a backend row."""
import json

import torch

from robustagg.bench import cli
from robustagg.bench.models import EXPECTED_D, model_layout
from robustagg.bench.timing import Timer


def test_model_presets_have_their_parameter_counts():
    for name, d in EXPECTED_D.items():
        assert model_layout(name).d == d, name


def test_bench_writes_a_row_per_case_and_backend(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["--model", "mlp-phishing", "--n", "8", "--repeats", "1", "--aggregators",
                     "--aggregator-n", "10", "--json", str(out), "--csv", str(tmp_path / "b.csv")]) == 0
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
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert {r["backend"] for r in aggregators} == {"torch-ref", "auto"}


def test_a_case_that_runs_out_of_gpu_memory_is_skipped_and_noted():
    timer = Timer(torch.device("cpu"), repeats=1)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    skipped = []
    assert cli._median_or_none(timer, out_of_memory, "ops median n=100 [torch-ref]", skipped) is None
    assert skipped == ["ops median n=100 [torch-ref]: out of memory"]
    assert cli._median_or_none(timer, lambda: None, "ops median n=100 [cpu]", skipped) > 0
    assert len(skipped) == 1
