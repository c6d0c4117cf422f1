"""``fusedattn bench --plot``: GFLOP/s per shape and library as a grouped bar chart.

matplotlib comes from the optional ``[plot]`` extra. The chart is drawn on an Agg canvas of its own,
never through pyplot, so it works headless and leaves the caller's matplotlib backend alone.
"""
from __future__ import annotations

from typing import List

__all__ = ["attention_map", "plot_bench", "require_matplotlib"]

# fusedattn and its forced-ISA variants in blues (darkest: the selected path), the baselines apart.
_COLOURS = {"fusedattn": "#1f4e9c", "onnxruntime": "#3a923a", "torch": "#e07b24", "naive": "#8c8c8c"}
_VARIANT_COLOURS = ("#5b8bd0", "#9dbbe6", "#c9daf2")


def require_matplotlib() -> None:
    """Raise ``ImportError`` with an install hint when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"--plot needs matplotlib, which cannot be imported ({exc}); install it with "
            "pip install 'fusedattn[plot]'"
        ) from None


def plot_bench(document: dict, path: str) -> None:
    """Draw the rows of a ``fusedattn bench`` document (as written by ``--json``) to ``path``.

    One group of bars per shape, one bar per library (fusedattn, its ``--isa`` variants, onnxruntime,
    torch, naive NumPy) at its GFLOP/s; the measured fp32 FMA peak is a horizontal line (and half of it
    for float64, when such rows exist). fusedattn's bars carry their % of peak, or for memory-bound
    rows their % of bandwidth, whose GFLOP/s alone would read as failure. The format follows
    ``path``'s extension (PNG when it has none).
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = document["rows"]
    libraries = _libraries(rows)
    roofline = document.get("roofline") or {}
    peak = roofline.get("fp32_peak_gflops")

    fig = Figure(figsize=(max(8.0, 1.5 * len(rows) + 3), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(libraries))
    tallest = 0.0
    variant_colours = iter(_VARIANT_COLOURS * len(libraries))
    for j, lib in enumerate(libraries):
        colour = _COLOURS.get(lib) or next(variant_colours)
        offsets = [i - 0.4 + width * (j + 0.5) for i in range(len(rows))]
        heights = [row["results"].get(lib, {}).get("gflops") for row in rows]
        ax.bar([x for x, h in zip(offsets, heights) if h is not None], [h for h in heights if h is not None],
               width=width * 0.95, color=colour, label=lib)
        tallest = max([tallest] + [h for h in heights if h is not None])
        for x, h, row in zip(offsets, heights, rows):
            if h is None:
                # An empty slot would read as zero; say why there is no bar.
                reason = "skipped" if "skipped" in row["results"].get(lib, {"skipped": ""}) else "error"
                ax.text(x, 0, reason, rotation=90, ha="center", va="bottom", fontsize=7, color="#555555")
            elif lib == "fusedattn":
                label = _efficiency_label(row)
                if label:
                    ax.text(x, h, label, ha="center", va="bottom", fontsize=7, color=colour, rotation=90)

    if peak:
        threads = roofline.get("threads")
        ax.axhline(peak, color="#c0392b", linestyle="--", linewidth=1.2,
                   label=f"fp32 FMA peak {peak:.0f} GFLOP/s ({roofline.get('isa')}, {threads} threads)")
        tallest = max(tallest, peak)
        if any(row["dtype"] == "float64" for row in rows):
            ax.axhline(peak / 2, color="#c0392b", linestyle=":", linewidth=1.0,
                       label=f"float64 peak (half): {peak / 2:.0f} GFLOP/s")

    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_shape_label(row) for row in rows], fontsize=8)
    ax.set_ylabel("GFLOP/s (4·B·H·Lq·Lk·D, halved if causal)")
    ax.set_ylim(0, tallest * 1.25 if tallest else 1)
    info = document.get("backend_info", {})
    ax.set_title(f"fusedattn {info.get('version', '')} vs its peers and naive NumPy, {document.get('threads')} threads\n"
                 "on fusedattn's bars: % of the peak, or for decode rows % of the read bandwidth", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # Beside the axes, not on them: with several --isa variants it would cover the tallest bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=120)


def _libraries(rows) -> List[str]:
    from ._bench import ISAS, library_isa

    seen = {lib for row in rows for lib in row["results"]}
    # Fastest path first, so the blues fade as the forced paths slow down.
    variants = sorted((lib for lib in seen if library_isa(lib) in ISAS), key=lambda lib: -ISAS.index(library_isa(lib)))
    return [lib for lib in ("fusedattn", *variants, "onnxruntime", "torch", "naive") if lib in seen]


def _efficiency_label(row: dict) -> str:
    result = row["results"]["fusedattn"]
    if row.get("bound") == "memory" and row.get("cache_resident"):
        return "in cache"
    if row.get("bound") == "memory" and result.get("pct_of_bandwidth") is not None:
        return f"{result['pct_of_bandwidth']:.0f}% bw"
    if result.get("pct_of_peak") is not None:
        return f"{result['pct_of_peak']:.0f}%"
    return ""


def _shape_label(row: dict) -> str:
    dims = "x".join(str(row[key]) for key in ("batch", "heads", "lq", "lk", "d"))
    return f"{dims}\n{row['dtype']}{' causal' if row['causal'] else ''}"


def attention_map(weights, query_labels=None, key_labels=None, ax=None):
    """Draw a ``(Lq, Lk)`` attention-weight matrix as a heatmap with a colorbar; return the Axes.

    Args:
        weights: array-like ``(Lq, Lk)``, e.g. one head's probabilities from
            :func:`fusedattn.attention_weights` or a layer's ``need_weights`` output. Leading axes of
            size 1 are dropped (``(1, Lq, Lk)``, ``(1, 1, Lq, Lk)``); any other rank is a ``ValueError``.
        query_labels: optional ``Lq`` labels for the rows (e.g. target words); key_labels: ``Lk``
            labels for the columns (e.g. source words). Without labels the axes show indices.
        ax: a matplotlib Axes to draw on. When None, a new Figure is made on its own Agg canvas, not
            through pyplot, so this works headless and leaves the caller's backend alone; save it with
            ``ax.figure.savefig(path)``.

    Returns:
        The matplotlib ``Axes`` holding the image (rows: queries, columns: keys).

    Raises ``ImportError`` naming the ``fusedattn[plot]`` extra when matplotlib is missing.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> from fusedattn.plot import attention_map
        >>> w = fa.attention_weights(np.eye(3, 4), np.eye(5, 4))      # (3, 5), rows sum to 1
        >>> ax = attention_map(w, ["a", "b", "c"], list("vwxyz"))
        >>> ax.figure.savefig("attention.png")                        # doctest: +SKIP
    """
    try:
        from matplotlib.axes import Axes
    except ImportError as exc:
        raise ImportError(
            f"fusedattn.plot.attention_map needs matplotlib, which cannot be imported ({exc}); install it with "
            "pip install 'fusedattn[plot]'"
        ) from None
    import numpy as np

    try:
        matrix = np.asarray(weights)
    except Exception as exc:
        raise TypeError(f"weights must be a numeric array of shape (Lq, Lk), could not convert {type(weights).__name__}: {exc}") from None
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise TypeError(f"weights must be a real-valued numeric array of shape (Lq, Lk), got dtype {matrix.dtype}")
    original_shape = matrix.shape
    while matrix.ndim > 2 and matrix.shape[0] == 1:  # (1, Lq, Lk) and the like: one head / one batch entry
        matrix = matrix[0]
    if matrix.ndim != 2:
        raise ValueError(f"weights must have shape (Lq, Lk) (leading axes of size 1 are dropped), got shape {original_shape}")
    if matrix.size == 0:
        raise ValueError(f"weights must not be empty, got shape {original_shape}")
    lq, lk = matrix.shape
    labels = {}
    for name, given, n in (("query_labels", query_labels, lq), ("key_labels", key_labels, lk)):
        if given is None:
            continue
        if isinstance(given, str):
            raise TypeError(f"{name} must be a sequence of {n} labels, got a single string {given!r}")
        given = [str(label) for label in given]
        if len(given) != n:
            raise ValueError(f"{name} must have {n} entries (weights has shape {original_shape}), got {len(given)}")
        labels[name] = given
    if ax is not None and not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")

    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # Grow with the matrix so that word labels stay legible, within sane bounds.
        fig = Figure(figsize=(min(16.0, max(4.0, 0.5 * lk + 2.5)), min(12.0, max(3.0, 0.4 * lq + 1.8))),
                     layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    # Probabilities are non-negative: pin the colour scale at 0 so that "no weight" is always one colour.
    vmin = 0.0 if np.nanmin(matrix) >= 0 else None
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest", vmin=vmin)
    ax.figure.colorbar(image, ax=ax, label="attention weight")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    for axis, n, name, setter in ((ax.xaxis, lk, "key_labels", ax.set_xticklabels),
                                  (ax.yaxis, lq, "query_labels", ax.set_yticklabels)):
        if name in labels:
            axis.set_ticks(range(n))
            if name == "key_labels":
                setter(labels[name], rotation=45, ha="right", rotation_mode="anchor")
            else:
                setter(labels[name])
        elif n <= 32:
            axis.set_ticks(range(n))  # every index while they fit; matplotlib's own ticks beyond
    return ax
