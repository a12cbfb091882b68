"""The layout is the architecture: no import cycles among cellbg's modules, and the modules
that must stay light (statistics, report, planning, the runner's client side) never reach
torch, however indirectly.

The import graph comes from grimp (the engine of import-linter), which reads every import
statement in the source, those inside functions included.
"""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("cellbg", include_external_packages=True)


def _cellbg_modules(graph) -> list[str]:
    return sorted(m for m in graph.modules if m == "cellbg" or m.startswith("cellbg."))


def test_no_import_cycle_among_cellbg_modules(graph):
    cycles = []
    for module in _cellbg_modules(graph):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("cellbg") and imported != module:
                back = graph.find_shortest_chain(importer=imported, imported=module)
                if back is not None:
                    cycles.append(" -> ".join((module, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_the_graph_sees_imports_inside_functions(graph):
    # the check above is only as good as the graph: cellbg.data imports cellbg.synth inside
    # a function (synthetic datasets are made on first use), and that edge must be there
    assert graph.direct_import_exists(importer="cellbg.data", imported="cellbg.synth")
    assert not graph.chain_exists(importer="cellbg.synth", imported="cellbg.data")


@pytest.mark.parametrize(
    "module",
    ["cellbg.stats", "cellbg.report", "cellbg.planning", "cellbg.protocol", "cellbg.runner.loop"],
)
def test_light_modules_never_reach_torch(graph, module):
    modules = [module, *sorted(graph.find_descendants(module))] if graph.find_children(module) else [module]
    chains = [graph.find_shortest_chain(importer=m, imported="torch") for m in modules]
    found = [" -> ".join(c) for c in chains if c]
    assert not found, f"{module} reaches torch: {found[0] if found else ''}"
