"""Drawing gradient graphs with networkx and matplotlib."""
from __future__ import annotations

import torch

_ROLE_COLORS = {"input": "#4c72b0", "hidden": "#8c8c8c", "output": "#c44e52"}


def draw_graph(graph, path: str | None = None, ax=None, max_edges: int = 3000, feature: str | None = "g"):
    """Draw a gradient graph layer by layer (left to right in dataflow order). Node colour: role (input,
    hidden, output); with ``feature="g"`` or ``"a"`` node size grows with the mean |g| or |a| over the set.
    Edges (one per in/out neuron pair) are drawn thin; at most ``max_edges`` of them, evenly subsampled.
    Returns the matplotlib Axes; saves a PNG when ``path`` is given."""
    import matplotlib

    if path is not None and ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx

    graph._single("draw_graph")
    nxg = graph.to_networkx()
    spec = graph.spec
    pos = {}
    for li, layer in enumerate(spec.layers):
        n = layer.size
        for i, node in enumerate(layer.nodes):
            pos[node] = (li, (i - (n - 1) / 2) / max(n, 1))
    sizes = [20.0] * graph.num_nodes
    if feature in ("a", "g"):
        ch = 0 if feature == "a" else 1
        mag = torch.zeros(graph.num_nodes, dtype=graph.entry_x.dtype)
        cnt = torch.zeros(graph.num_nodes, dtype=graph.entry_x.dtype)
        mag.index_add_(0, graph.entry_node, graph.entry_x[:, ch].abs())
        cnt.index_add_(0, graph.entry_node, graph.entry_mask[:, ch].to(mag.dtype))
        mean = mag / cnt.clamp_min(1)
        sizes = (10 + 80 * mean / mean.max().clamp_min(1e-12)).tolist()
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(max(7.0, 2 + 0.6 * len(spec.layers)), 24), 5))
    edges = list(nxg.edges())
    if len(edges) > max_edges:
        edges = edges[:: len(edges) // max_edges + 1]
    nx.draw_networkx_edges(nxg, pos, edgelist=edges, ax=ax, alpha=0.15, width=0.4, arrows=False)
    colors = [_ROLE_COLORS[d["role"]] for _, d in nxg.nodes(data=True)]
    nx.draw_networkx_nodes(nxg, pos, ax=ax, node_size=sizes, node_color=colors)
    ax.tick_params(axis="x", bottom=True, labelbottom=True)  # networkx switches tick labels off
    ax.set_xticks(range(len(spec.layers)))
    ax.set_xticklabels([layer.key for layer in spec.layers], rotation=60, ha="right", fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"gradient graph: {graph.num_nodes} neurons, {graph.num_edges} weight edges, "
                 f"{graph.num_samples} samples\nnode colour: role; node size: mean |{feature}| over the set",
                 fontsize=9)
    for role, c in _ROLE_COLORS.items():
        ax.scatter([], [], color=c, label=role)
    ax.legend(loc="upper left", fontsize=7)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax
