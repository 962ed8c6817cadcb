"""The user documentation in docs/ is complete, self-contained and runnable:

* every public op, aggregator, attack and FL helper has a heading or table entry on its page, and
  every signature written there (names, order, keyword-only markers, defaults) is the code's;
* no user-visible file cites the internal contract, and every relative link (and #anchor)
  resolves inside the repository;
* every Python block of every page runs.
"""
import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import math
import pathlib
import re

import pytest

import robustagg.aggregators
import robustagg.attacks
import robustagg.fl
import robustagg.ops

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINKED = PAGES + [ROOT / "README.md"]
THIS = pathlib.Path(__file__).resolve()


def entries(page: str) -> str:
    """The headings and table rows of a page, where a public name must appear to count as documented."""
    lines = (DOCS / page).read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("#") or line.startswith("|"))


def public_aggregators() -> list[str]:
    return [name for name in robustagg.aggregators.__all__
            if inspect.isclass(cls := getattr(robustagg.aggregators, name))
            and issubclass(cls, robustagg.aggregators.Aggregator) and cls is not robustagg.aggregators.Aggregator]


def public_pre_aggregators() -> list[str]:
    return [name for name in robustagg.aggregators.__all__
            if inspect.isclass(cls := getattr(robustagg.aggregators, name))
            and issubclass(cls, robustagg.aggregators.PreAggregator) and cls is not robustagg.aggregators.PreAggregator]


@pytest.mark.parametrize("page, names", [
    ("ops.md", robustagg.ops.__all__),
    ("aggregators.md", public_aggregators() + public_pre_aggregators()),
    ("attacks.md", [name for name in robustagg.attacks.__all__ if name not in ("ATTACKS", "ADAPTIVE_ATTACKS")]),
    ("fl.md", robustagg.fl.__all__),
    ("flower.md", ["RobustStrategy"]),
])
def test_every_public_name_has_an_entry(page, names):
    assert names, f"no public names found for {page}"
    text = entries(page)
    missing = [name for name in names if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
    assert not missing, f"{page} has no heading or table entry for {missing}"


def summary_rows() -> dict[str, list[str]]:
    """Aggregator name -> the cells of its row in aggregators.md's summary table."""
    text = (DOCS / "aggregators.md").read_text()
    table = text[text.index("## Summary"):text.index("Notation:")]
    rows = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[0]):
            rows[name] = cells
    return rows


def test_summary_table_matches_the_classes():
    """Weights, state, randomness and the default buffer policy, as the summary table states them."""
    rows = summary_rows()
    assert sorted(rows) == sorted(public_aggregators() + public_pre_aggregators())
    wrong = []
    for name, (_, _, weights, stateful, randomized, buffers) in rows.items():
        cls = getattr(robustagg.aggregators, name)
        if cls is robustagg.aggregators.Pipeline:   # each of its facts is its final rule's or its stages'
            facts = {"row": ((weights, stateful, randomized, buffers), ("final's", "final's", "stages'", "final's"))}
        else:
            facts = {"uses weights": (weights != "", cls.uses_weights),
                     "stateful": (stateful != "", hasattr(cls, "state_dict")),
                     "randomized": (randomized != "", "generator" in inspect.signature(cls.__init__).parameters),
                     # a pre-aggregator's buffers are its pipeline's
                     "default buffers": (buffers, f'`"{cls.default_buffers}"`' if hasattr(cls, "default_buffers") else "")}
        wrong += [f"{name}: {what} is {doc!r} in the table, {code!r} in the code"
                  for what, (doc, code) in facts.items() if doc != code]
    assert not wrong, wrong


def test_every_report_field_is_documented():
    text = (DOCS / "aggregators.md").read_text()
    reports = [getattr(robustagg.aggregators, name) for name in robustagg.aggregators.__all__
               if dataclasses.is_dataclass(getattr(robustagg.aggregators, name))]
    missing = sorted({f"{r.__name__}.{f.name}" for r in reports for f in dataclasses.fields(r)
                      if f"`{f.name}`" not in text})
    assert len(reports) > 5 and not missing, missing


# Keyword arguments every op or aggregator takes, described once at the top of its page.
COMMON = {"ops.md": {"nonfinite", "backend", "rows", "return_nonfinite"},
          "aggregators.md": set(inspect.signature(robustagg.aggregators.Aggregator.__init__).parameters)}


def documented_signatures(page: str) -> dict[str, list[ast.arguments]]:
    """Qualified name -> the argument lists of the page's ``name(args)`` code spans that parse as
    signatures (calls such as ``order_mean(G, trim, n - trim)`` do not)."""
    found = {}
    for name, args in re.findall(r"`(?:fl\.|attacks\.)?([A-Za-z_][\w.]*)\(([^`]*?)\)`", (DOCS / page).read_text()):
        try:
            found.setdefault(name, []).append(ast.parse(f"def _({args}): pass").body[0].args)
        except SyntaxError:
            continue
    return found


def code_signature(obj, skip: set) -> list[tuple]:
    """(kind, name, default) of each parameter of a function or class, as the docs write them."""
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.name in skip or p.kind is p.VAR_KEYWORD and p.name == "kw":
            continue
        out.append((p.kind.name, p.name, p.default))
    return out


def doc_signature(args: ast.arguments) -> list[tuple]:
    plain = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(plain) - len(args.defaults)) + list(args.defaults)
    out = [("POSITIONAL_OR_KEYWORD", a.arg, d) for a, d in zip(plain, defaults)]
    out += [("KEYWORD_ONLY", a.arg, inspect.Parameter.empty if d is None else d)
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.vararg:
        out.insert(len(plain), ("VAR_POSITIONAL", args.vararg.arg, inspect.Parameter.empty))
    if args.kwarg:
        out.append(("VAR_KEYWORD", args.kwarg.arg, inspect.Parameter.empty))
    return out


def same_default(doc, code) -> bool:
    if doc is inspect.Parameter.empty or code is inspect.Parameter.empty:
        return doc is code
    text = ast.unparse(doc)
    if callable(code):
        return text == code.__name__
    if isinstance(code, float) and math.isnan(code):
        return text == "nan"
    return ast.literal_eval(text) == code


def render(signature: list[tuple]) -> str:
    """A signature as the docs write it, for messages."""
    def one(kind, name, default):
        if default is inspect.Parameter.empty:
            return ("**" if kind == "VAR_KEYWORD" else "") + name
        return f"{name}={ast.unparse(default) if isinstance(default, ast.AST) else repr(default)}"
    parts, starred = [], False
    for kind, name, default in signature:
        if kind == "KEYWORD_ONLY" and not starred:
            parts.append("*")
            starred = True
        parts.append(one(kind, name, default))
    return ", ".join(parts)


def signatures_match(doc: list[tuple], code: list[tuple]) -> bool:
    return len(doc) == len(code) and all(
        dk == ck and dn == cn and same_default(dd, cd) for (dk, dn, dd), (ck, cn, cd) in zip(doc, code))


def documented_objects():
    yield "ops.md", {name: getattr(robustagg.ops, name) for name in robustagg.ops.__all__
                     if inspect.isfunction(getattr(robustagg.ops, name))}
    yield "attacks.md", {name: getattr(robustagg.attacks, name) for name in robustagg.attacks.__all__ if name not in ("ATTACKS", "ADAPTIVE_ATTACKS")}
    yield "fl.md", {name: getattr(robustagg.fl, name) for name in robustagg.fl.__all__}
    classes = {name: getattr(robustagg.aggregators, name) for name in public_aggregators() + public_pre_aggregators()}
    presets = {f"{name}.{m}": getattr(cls, m) for name, cls in classes.items() for m in ("paper", "official")
               if m in vars(cls)}
    yield "aggregators.md", {**classes, **presets}


@pytest.mark.parametrize("page, objects", list(documented_objects()), ids=lambda x: x if isinstance(x, str) else "")
def test_documented_signatures_match_the_code(page, objects):
    """Names, order, keyword-only markers and defaults as documented are those of the code, so a
    changed default cannot leave its page behind."""
    found = documented_signatures(page)
    skip = {"self", "cls"} | COMMON.get(page, set())
    problems = []
    for name, obj in objects.items():
        code = code_signature(obj, skip)
        docs = [doc_signature(args) for args in found.get(name, [])]
        # classes that share a constructor (EuDen, MgDen with CosDen) may be documented once
        shares = [other for other, o in objects.items() if other in found and other != name
                  and inspect.isclass(o) and inspect.isclass(obj) and o.__init__ is obj.__init__]
        if not docs and not shares:
            problems.append(f"{name}: no signature on {page}")
        problems += [f"{name}: documented ({render(d)}), code ({render(code)})" for d in docs
                     if not signatures_match(d, code)]
    assert not problems, problems


def user_visible_files():
    """Every source and Markdown file a user or contributor reads (this test names the pattern)."""
    suffixes = (".py", ".md", ".h", ".cpp", ".cu", ".cuh")
    for folder in ("robustagg", "kernels", "csrc", "docs", "examples", "benchmarks", "tests"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in suffixes and p != THIS)
    yield ROOT / "README.md"


def test_no_file_cites_the_internal_contract():
    # TORCH_SPEC (a Makefile variable) is a word of its own and allowed
    pattern = re.compile(r"\bSPEC\b|§|shared/")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in user_visible_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)   # no headings inside code
    return {slug(line) for line in text.splitlines() if line.startswith("#")}


def links(path: pathlib.Path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


def test_relative_links_resolve():
    broken = []
    for page in LINKED:
        for target in links(page):
            if re.match(r"[a-z]+:", target):
                continue                       # http(s), mailto: not checked offline
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or ROOT not in path.parents and path != ROOT:
                broken.append(f"{page.name}: {target} (no such file in the repository)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.name}: {target} (no heading with that anchor)")
    assert not broken, broken


def test_the_link_checker_sees_links_and_anchors():
    assert slug("### Krum, MultiKrum, MultiKrumCos") == "krum-multikrum-multikrumcos"
    assert slug("## Huge finite values") == "huge-finite-values"
    assert slug("### `topk_ef_step(u, error)`") == "topk_ef_stepu-error"
    assert "huge-finite-values" in anchors(DOCS / "nonfinite.md")
    assert any(t.startswith("docs/") for t in links(ROOT / "README.md"))


def test_every_page_is_in_the_index():
    index = (DOCS / "README.md").read_text()
    assert [p.name for p in PAGES if p.name != "README.md" and f"({p.name})" not in index] == []


@pytest.mark.parametrize("page", [p.name for p in PAGES if "```python" in p.read_text()])
def test_python_blocks_run(page):
    if page == "flower.md" and importlib.util.find_spec("flwr") is None:
        pytest.skip("flwr is not installed (pip install robustagg[flower])")
    namespace = {"__name__": f"docs_{page}"}
    for block in re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.S | re.M):
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, str(DOCS / page), "exec"), namespace)
