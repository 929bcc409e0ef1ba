"""Pictures of a fit: the measured timeline as a Gantt chart, and the learning curves.

Needs matplotlib (``pip install "skpipe[plot]"``).
"""

from __future__ import annotations

from typing import Any

from .engine.plan._timeline import Timeline

COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#DD8452", "W": "#55A868", "wait": "#BBBBBB"}
LABELS = {
    "F": "forward",
    "B": "backward",
    "I": "backward (input grad)",
    "W": "backward (weight grad)",
    "wait": "idle (waiting on another stage)",
}
# the k-th chunk a rank hosts (interleaved, looped and V schedules host several) is hatched so
HATCHES = ("", "////", "....", "xxxx", "\\\\\\\\", "++++")


def plot_timeline(timeline: Timeline, ax: Any = None, title: str | None = None) -> Any:
    """Draw the recorded spans of a fit: one row per stage, time in ms from the first span.

    Forward spans are blue, backward orange (input-gradient halves too), weight-gradient green,
    idle time (waiting on another stage) grey; each compute span is labelled with its
    micro-batch. Where a rank hosts several chunks (interleaved, looped and V schedules), its
    k-th chunk is hatched its own way and its spans are labelled ``micro-batch/chunk``. The title
    gives the measured bubble beside the schedule's theoretical one; the legend stands to the
    right of the axes, over no bar.

    Parameters
    ----------
    timeline : Timeline
        ``est.timeline_`` of an estimator fitted with ``timeline_steps > 0``.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    ax : matplotlib Axes
    """
    import matplotlib.pyplot as plt

    n_rows = timeline.n_ranks  # one row per rank of the (replica x stage) mesh
    made_here = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * n_rows))
    if not timeline.spans:
        raise ValueError(
            "the timeline has no spans: fit with timeline_steps > 0 and at least 2 steps"
        )
    t0 = min(s.start for s in timeline.spans)
    # each rank's chunks in order: chunk c is the k-th chunk of its rank
    nth = {}
    for rank in {s.rank for s in timeline.spans}:
        for k, c in enumerate(sorted({s.chunk for s in timeline.spans if s.rank == rank})):
            nth[rank, c] = k
    n_chunks = 1 + max(nth.values(), default=0)  # the most chunks one rank hosts
    several = n_chunks > 1
    seen: list[str] = []  # the kinds drawn, in the order the legend lists them
    for s in sorted(
        timeline.spans + timeline.waits(), key=lambda s: s.kind == "wait", reverse=True
    ):
        y = n_rows - 1 - s.rank
        height = 0.3 if s.kind == "wait" else 0.8
        if s.kind not in seen:
            seen.append(s.kind)
        k = nth.get((s.rank, s.chunk), 0) if s.kind != "wait" else 0
        ax.broken_barh(
            [((s.start - t0) * 1e3, (s.end - s.start) * 1e3)],
            (y - height / 2, height),
            facecolors=COLORS[s.kind],
            edgecolor="white",
            linewidth=0.3,
            hatch=HATCHES[k % len(HATCHES)],
        )
        width = (s.end - s.start) * 1e3
        if s.kind != "wait" and width > 0:
            ax.text(
                (s.start - t0) * 1e3 + width / 2,
                y,
                f"{s.microbatch}/{s.chunk}" if several else str(s.microbatch),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
                clip_on=True,
            )
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([timeline.rank_label(n_rows - 1 - i) for i in range(n_rows)])
    ax.set_xlabel("time (ms)")
    measured = timeline.measured_bubble()
    ax.set_title(
        title
        or (
            f"{timeline.schedule}: {timeline.n_stages} stages"
            + (f" x {timeline.n_replicas} replicas, " if timeline.n_replicas > 1 else ", ")
            + f"{timeline.n_microbatches} micro-batches, "
            f"{len(timeline.steps())} step(s)\nmeasured bubble {measured:.0%}, "
            f"theoretical {timeline.theoretical_bubble:.0%}"
        ),
        fontsize=9,
    )
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(facecolor=COLORS[kind]) for kind in seen]
    labels = [LABELS[kind] for kind in seen]
    if several:
        for k in range(n_chunks):
            handles.append(Patch(facecolor="white", edgecolor="#555555",
                                 hatch=HATCHES[k % len(HATCHES)]))
            labels.append(f"chunk {k + 1} of a stage (span label: micro-batch/chunk)"
                          if k == 0 else f"chunk {k + 1} of a stage")
    # outside the axes, to their right: it covers no bar
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              fontsize=7, frameon=False)
    if made_here:
        ax.figure.tight_layout()  # room for the legend beside the axes
    return ax


def plot_learning_curves(history: Any, ax: Any = None) -> Any:
    """Training (and validation) loss per epoch from ``est.history_``.

    Parameters
    ----------
    history : skorch History
    ax : matplotlib Axes, optional

    Returns
    -------
    ax : matplotlib Axes
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    epochs = history[:, "epoch"]
    ax.plot(epochs, history[:, "train_loss"], marker="o", label="train loss")
    if "valid_loss" in history[-1]:
        ax.plot(epochs, history[:, "valid_loss"], marker="o", label="valid loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return ax
