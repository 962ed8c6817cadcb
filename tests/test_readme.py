"""The README's example runs as written, doctest-style: its Python block is executed, every
``print(...)  # expected`` line must print what its comment says, and the state it builds must
follow the update convention (docs/fl.md)."""
import contextlib
import io
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def expected_prints(block: str) -> list[str]:
    """The comment of every ``print(...)  # text`` line, in order: what that line must print."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+)$", block, re.M)]


@pytest.fixture(scope="module")
def example():
    """(block, namespace, printed lines) of one run of the README's example."""
    (block,) = python_blocks(README)
    namespace = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), namespace)
    return block, namespace, out.getvalue().splitlines()


def test_readme_keeps_the_two_setup_commands():
    setup = README[README.index("## Set up and run"):README.index("## Use")]
    commands = [line.split("#")[0].strip() for line in setup.splitlines() if line.startswith("make ")]
    assert commands == ["make test", "make bench"]


def test_readme_example_prints_what_it_says(example):
    block, _, printed = example
    expected = expected_prints(block)
    assert expected, "the README example should show what it prints"
    assert printed == expected


def test_readme_example_follows_the_update_convention(example):
    _, ns, _ = example
    agg, old, new = ns["agg"], ns["global_state"], ns["new_global"]
    report = agg.last_report
    assert report.rejected_nonfinite == [3, 7]
    assert not {3, 7} & set(report.selected)

    assert list(new) == list(old)
    for key in old:
        assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape, key
        assert bool(torch.isfinite(new[key].double()).all()), key
    # every client advanced its counter by one, so the global one advances by exactly one
    counters = [k for k in old if k.endswith("num_batches_tracked")]
    assert counters and all(int(new[k]) == int(old[k]) + 1 for k in counters)
    variances = [k for k in old if k.endswith("running_var")]
    assert variances and all(bool((new[k] >= 0).all()) for k in variances)

    # SignGuard's output is a mean of updates clipped to the median norm: the server's step, over
    # the weights that went through the rule, is no longer than the median honest delta
    weights = [k for k in old if old[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    step = torch.cat([(new[k].double() - old[k].double()).flatten() for k in weights])
    honest = [i for i in range(len(ns["updates"])) if i not in (3, 7)]
    norms = torch.tensor([float(torch.cat([ns["updates"][i][k].double().flatten() for k in weights]).norm())
                          for i in honest])
    assert 0 < float(step.norm()) <= float(norms.median()) * (1 + 1e-6)


def test_readme_ops_match_their_definitions(example):
    _, ns, _ = example
    G = ns["G"]
    ranked = G.double().sort(dim=0).values
    torch.testing.assert_close(ns["tm"].double(), ranked[5:15].mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ns["med"].double(), ranked[9:11].mean(dim=0), rtol=1e-5, atol=1e-6)
    agreement = torch.sign(G).sum(dim=0).abs() / G.shape[0]
    assert torch.equal(ns["mask"], agreement > 0.6)
    torch.testing.assert_close(ns["out"].double(), torch.where(ns["mask"], ranked[5:15].mean(dim=0), 0.0),
                               rtol=1e-5, atol=1e-6)
