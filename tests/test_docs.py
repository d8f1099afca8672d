"""The documentation stays true to the repository: every relative link of README.md, BENCHMARKS.md
and docs/*.md leads to a file that exists (and to one of its headings, for a #anchor), and the
module table of docs/contributing.md says exactly what each module of the stepd package imports
of stepd."""

import ast
import re

import pytest
from helpers import ROOT

PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *PAGES]
PACKAGE = ROOT / "stepd"
CONTRIBUTING = ROOT / "docs" / "contributing.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


# -- links --------------------------------------------------------------------------------------
def prose(text):
    """The text without fenced code blocks and code spans, where a link is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading):
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped (letters,
    digits, spaces, '-' and '_' kept), each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower().replace("`", "")
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor the headings of the markdown file `path` make (a repeated one gets -1, -2...)."""
    seen, made = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        found = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if found:
            base = slug(found.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            made.add(base if count == 0 else f"{base}-{count}")
    return made


def relative_links(path):
    return [target for target in LINK.findall(prose(path.read_text())) if not SCHEME.match(target)]


def test_slugs_are_githubs():
    assert slug("How the code is laid out") == "how-the-code-is-laid-out"
    assert slug("`STEPD_SYNC`: what each mode risks and costs") == "stepd_sync-what-each-mode-risks-and-costs"
    assert slug("Results that flow forward, skip and cancel, with curl") == (
        "results-that-flow-forward-skip-and-cancel-with-curl"
    )
    assert slug("2026-12-02: retention under load") == "2026-12-02-retention-under-load"


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    assert PAGES, "docs/ holds no page"
    assert {page.resolve() for page in PAGES} <= linked, set(PAGES) - linked


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(doc):
    broken = []
    for target in relative_links(doc):
        where, _, anchor = target.partition("#")
        path = (doc.parent / where).resolve() if where else doc
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading of {path.name} makes #{anchor}")
        elif anchor and path.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not markdown")
    assert not broken, "\n".join(broken)


# -- the module table ---------------------------------------------------------------------------
def module_name(path):
    """A module of the package as the table names it: `model.py`; a subpackage (`delegates/`, `ui/`)
    is one row."""
    relative = path.relative_to(PACKAGE)
    return f"{relative.parts[0]}/" if len(relative.parts) > 1 else relative.name


MODULES = {}
for _path in sorted(PACKAGE.rglob("*.py")):
    MODULES.setdefault(module_name(_path), []).append(_path)


def imported(dotted):
    """The row of stepd that an `import stepd.x…` or `from stepd.x… import` names, or None."""
    parts = dotted.split(".")
    if parts[0] != "stepd":
        return None
    if len(parts) == 1:
        return "__init__.py"
    return f"{parts[1]}/" if (PACKAGE / parts[1]).is_dir() else f"{parts[1]}.py"


def from_the_package(name):
    """The row `from stepd import name` imports: the module `name`, or stepd/__init__.py for a name
    defined there (`from stepd import delegate`)."""
    if (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir():
        return imported(f"stepd.{name}")
    return "__init__.py"


class Imports(ast.NodeVisitor):
    """The stepd modules a file imports: at its top level (run on import, also inside a class body,
    a try or an if) and inside functions (run when the function is called)."""

    def __init__(self, path):
        self.path = path
        self.package = ".".join(("stepd", *path.relative_to(PACKAGE).parent.parts))
        self.depth = 0
        self.top, self.local = set(), set()

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, rows):
        (self.local if self.depth else self.top).update(row for row in rows if row)

    def visit_Import(self, node):
        self._add(imported(alias.name) for alias in node.names)

    def visit_ImportFrom(self, node):
        if node.level:  # relative: from the package this file is in
            base = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        if module == "stepd":  # from stepd import x: the module x, or a name of stepd/__init__.py
            self._add(from_the_package(alias.name) for alias in node.names)
        else:
            self._add([imported(module)])


def actual_imports(row):
    """(top-level, inside functions only) stepd rows that the files of `row` import, itself aside."""
    top, local = set(), set()
    for path in MODULES[row]:
        found = Imports(path)
        found.visit(ast.parse(path.read_text(), str(path)))
        top |= found.top
        local |= found.local
    top.discard(row)
    local.discard(row)
    return top, local - top


def table():
    """The module table of docs/contributing.md, in order: [(module, top-level, inside functions)]."""
    text = CONTRIBUTING.read_text()
    lines = text.split("<!-- modules:start -->")[1].split("<!-- modules:end -->")[0].strip().splitlines()
    assert lines[0].startswith("| module") and set(lines[1]) <= set("|-: "), lines[:2]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        [module] = re.findall(r"`([^`]+)`", cells[0])
        top_text, _, local_text = cells[2].partition("inside functions:")
        rows.append((module, set(re.findall(r"`([^`]+)`", top_text)), set(re.findall(r"`([^`]+)`", local_text))))
    return rows


def as_rows(names):
    """The table writes an import as the module's name (`model`, `delegates`, `__init__`)."""
    return {name.removesuffix(".py").removesuffix("/") for name in names}


def test_the_module_table_has_one_row_per_module_of_the_package():
    listed = [module for module, _, _ in table()]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == set(MODULES), (set(MODULES) - set(listed), set(listed) - set(MODULES))


def test_the_module_table_says_exactly_what_each_module_imports():
    wrong = []
    for module, top, local in table():
        real_top, real_local = actual_imports(module)
        if (top, local) != (as_rows(real_top), as_rows(real_local)):
            wrong.append(
                f"{module}: the table says {sorted(top)}, inside functions {sorted(local)}; "
                f"the code imports {sorted(as_rows(real_top))}, inside functions {sorted(as_rows(real_local))}"
            )
    assert not wrong, "\n".join(wrong)


def test_each_module_imports_only_modules_above_it_in_the_table():
    """Read top to bottom, the table is the order to read the code in: no import goes down."""
    order = [as_rows([module]).pop() for module, _, _ in table()]
    upward = []
    for module, top, local in table():
        here = order.index(as_rows([module]).pop())
        upward += [f"{module} imports {name}" for name in sorted(top | local) if order.index(name) > here]
    assert not upward, "\n".join(upward)


def test_the_import_reader_counts_every_form():
    source = (
        "import stepd.db\nfrom stepd import config, delegate\nfrom stepd.model import VERSION\n"
        "from . import channel\n\n\ndef later():\n"
        "    from stepd.store import Store\n    import stepd.delegates.builtin\n"
    )
    found = Imports(PACKAGE / "cli.py")
    found.visit(ast.parse(source))
    assert found.top == {"db.py", "config.py", "__init__.py", "model.py", "channel.py"}
    assert found.local == {"store.py", "delegates/"}
