"""A picture of the partner network around a commune or a need: PNG (matplotlib, Agg)
and GraphML for Gephi users."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from partnerbus.directory.errors import DirectoryError
from partnerbus.directory.model import Directory

COLOURS = {
    "territory": "#c7d7e8",
    "need": "#f6d28b",
    "partner": "#8fc79a",
    "bailleur": "#e58f8f",
    "organisation": "#b9a6d9",
}


def neighbourhood(
    d: Directory, commune: str | None = None, need: str | None = None, sender: str | None = None
) -> nx.DiGraph:
    """The part of the graph that matters around a commune and/or a need: the territories
    enclosing the commune and its QPVs, the partners covering them (serving the need if
    given), their organisations, the agreements between those organisations, and the needs
    served.
    With a sender, its partner node and organisation are added, so its agreements show."""
    if commune is None and need is None:
        msg = "give a commune, a need, or both"
        raise ValueError(msg)
    g = d.graph
    keep: set[str] = set()
    partners: set[str] = set()
    if commune is not None:
        if not d.has_commune(commune):
            msg = f"unknown commune {commune!r}"
            raise DirectoryError(msg)
        territory_nodes = {f"t:{code}" for code, _ in d.index.territory_chains[commune]}
        # the commune's QPVs too: a partner covering one of them only still works there
        territory_nodes |= {f"t:{q}" for q, c in d.index.qpv_commune.items() if c == commune}
        keep |= territory_nodes
        partners = {
            src
            for t in territory_nodes
            for src, _, kind in g.in_edges(t, data="type")
            if kind == "covers"
        }
    need_nodes: set[str] = set()
    if need is not None:
        if not d.has_need(need):
            msg = f"unknown need {need!r}"
            raise DirectoryError(msg)
        need_nodes = {f"n:{code}" for code in d.index.need_chains[need]}
        serving = {
            src
            for n in need_nodes
            for src, _, kind in g.in_edges(n, data="type")
            if kind == "serves"
        }
        partners = partners & serving if commune is not None else serving
        keep |= need_nodes
    if sender is not None:
        if sender not in d:
            msg = f"unknown partner {sender!r}"
            raise DirectoryError(msg)
        partners.add(f"p:{d.partner(sender).id}")
    keep |= partners
    orgs = {f"o:{d.partner(p[2:]).organisation}" for p in partners}
    keep |= orgs
    for p in partners:
        for _, dst, kind in g.out_edges(p, data="type"):
            if kind == "serves" and (need is None or dst in need_nodes):
                keep.add(dst)
            if kind == "covers" and commune is None:
                keep.add(dst)
    # insertion order is drawing order: territories from France down, then by id
    order = {"france": 0, "region": 1, "departement": 2, "epci": 3, "commune": 4, "qpv": 5}
    out = nx.DiGraph(name=g.graph.get("name", ""))
    out.add_nodes_from(
        (n, g.nodes[n])
        for n in sorted(keep, key=lambda n: (order.get(g.nodes[n].get("level", ""), 9), n))
    )
    out.add_edges_from((u, v, g.edges[u, v]) for u, v in g.subgraph(keep).edges)
    return out


def write_graphml(graph: nx.DiGraph, path: str | Path) -> None:
    """GraphML (Gephi, yEd, Cytoscape read it)."""
    nx.write_graphml(graph, str(path))


def render_png(graph: nx.DiGraph, path: str | Path, title: str = "") -> None:
    """Draw the graph to a PNG: colour per node type, agreements as dashed arrows."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    nodes = list(graph.nodes)
    layers = {"territory": 0, "need": 3, "partner": 1, "organisation": 2}
    for node in nodes:
        graph.nodes[node]["layer"] = layers.get(graph.nodes[node].get("type", ""), 1)
    pos = _columns(graph, nodes)
    colours = []
    for node in nodes:
        attrs = graph.nodes[node]
        kind = attrs.get("type", "partner")
        if kind == "partner" and attrs.get("kind") == "bailleur-social":
            kind = "bailleur"
        colours.append(COLOURS.get(kind, "#dddddd"))
    height = max(6.0, 0.32 * max(_layer_sizes(graph).values(), default=1))
    fig, ax = plt.subplots(figsize=(16, height))
    nx.draw_networkx_nodes(graph, pos, nodelist=nodes, node_color=colours, node_size=260, ax=ax)
    plain = [(u, v) for u, v, k in graph.edges(data="type") if k != "agreement"]
    agreements = [(u, v) for u, v, k in graph.edges(data="type") if k == "agreement"]
    nx.draw_networkx_edges(graph, pos, edgelist=plain, alpha=0.35, arrows=False, ax=ax)
    nx.draw_networkx_edges(
        graph,
        pos,
        edgelist=agreements,
        style="dashed",
        edge_color="#6a4fa0",
        connectionstyle="arc3,rad=0.25",
        arrows=True,
        arrowsize=10,
        ax=ax,
    )
    labels = {n: _short(graph.nodes[n].get("label") or n[2:], n) for n in nodes}
    nx.draw_networkx_labels(graph, pos, labels=labels, font_size=7, ax=ax)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=c, markersize=9, label=k)
        for k, c in COLOURS.items()
    ]
    handles.append(Line2D([], [], linestyle="--", color="#6a4fa0", label="agreement"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title)
    ax.set_axis_off()
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def _columns(graph: nx.DiGraph, nodes: list[str]) -> dict[str, tuple[float, float]]:
    """One column per node type, nodes top to bottom in insertion order."""
    columns: dict[int, list[str]] = {}
    for node in nodes:
        columns.setdefault(graph.nodes[node]["layer"], []).append(node)
    pos: dict[str, tuple[float, float]] = {}
    for layer, members in columns.items():
        for i, node in enumerate(members):
            y = 0.5 if len(members) == 1 else 1 - i / (len(members) - 1)
            pos[node] = (float(layer), y)
    return pos


def _layer_sizes(graph: nx.DiGraph) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for _, layer in graph.nodes(data="layer"):
        sizes[layer] = sizes.get(layer, 0) + 1
    return sizes


def _short(label: str, node: str, width: int = 38) -> str:
    if node.startswith("n:"):
        label = node[2:].split("--")[-1]
    return label if len(label) <= width else label[: width - 1] + "…"
