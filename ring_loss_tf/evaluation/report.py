"""Tables, results.json and plots of evaluation results.

`format_verification` is the short table train.py prints at the end of a
run; `format_table` is evaluate.py's table of `evaluation.ModelReport`s;
`write_outputs` writes `results.json` and PNG plots (ROC on a log-FAR axis,
CMC, norm histograms; matplotlib is imported only then).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np

from ring_loss_tf.evaluation import metrics
from ring_loss_tf.evaluation.protocols import ModelReport


def format_verification(result: metrics.VerificationResult, title: str) -> str:
    """A short markdown table of a `metrics.VerificationResult`.

    The table train.py prints at the end of a run (`evaluation.verify_pairs`):
    the pair counts, then the 10-fold accuracy (mean ± population std over
    folds) and TAR at FAR 1e-3 and 1e-4, in %; "n/a" where a FAR is below
    1/impostors or was not measured.
    """

    def rate(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    rows = [
        f"{title}: {result.num_genuine} genuine, {result.num_impostor} "
        "impostor pairs",
        "| 10-fold accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-4 |",
        "|---|---|---|",
        f"| {100 * result.accuracy_mean:.2f}% ± "
        f"{100 * result.accuracy_std:.2f}"
        f" | {rate(result.tar_at_far.get(1e-3))}"
        f" | {rate(result.tar_at_far.get(1e-4))} |",
    ]
    return "\n".join(rows)


NEAREST_RULE = "(insightface rule)"


def _pct(x, digits=2):
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def format_table(reports: Sequence[ModelReport]) -> str:
    """A plain-text table of the reports (rates in %)."""
    lines = []
    for report in reports:
        s = report.settings
        fars = s["fars"]
        lines.append(
            f"Model {report.model['name']}: metric={s['metric']}, "
            f"flip={s['flip']}"
        )
        if report.verification:
            rows = []
            for name, v in report.verification.items():
                rows.append((name, v["result"]))
                if "num_templates" in v:
                    # Published IJB tables use insightface's rule: its
                    # figure beside ours, on a row of its own.
                    rows.append((f"{name} {NEAREST_RULE}", v["result"]))
                for factor, low in v["low_res"].items():
                    rows.append((f"{name} 1/{factor:g}", low["result"]))
            width = max(len(name) for name, _ in rows) + 2
            head = (
                f"  {'set':<{width}}{'genuine/impostor':>17}"
                f"{'accuracy %':>16}"
                + "".join(f"{'TAR@' + format(f, '.0e'):>11}" for f in fars)
                + f"{'EER %':>8}{'AUC %':>8}"
            )
            lines.append(
                "  Verification (10-fold accuracy mean ± std; TAR in %, "
                "n/a: FAR below 1/impostors)"
            )
            if any(name.endswith(NEAREST_RULE) for name, _ in rows):
                lines.append(
                    f"  {NEAREST_RULE}: TAR of the point of sklearn's "
                    "default ROC nearest each FAR (insightface's IJB rule, "
                    "as in published IJB-B/C tables; may lie above the FAR); "
                    "the other rows: the highest TAR with FAR <= it"
                )
            lines.append(head)
            for name, r in rows:
                if name.endswith(NEAREST_RULE):
                    lines.append(
                        f"  {name:<{width}}{'':>17}{'':>16}"
                        + "".join(f"{_pct(r.tar_at_far_nearest.get(f)):>11}"
                                  for f in fars)
                    )
                    continue
                acc = f"{_pct(r.accuracy_mean)} ± {_pct(r.accuracy_std)}"
                lines.append(
                    f"  {name:<{width}}"
                    f"{f'{r.num_genuine}/{r.num_impostor}':>17}{acc:>16}"
                    + "".join(f"{_pct(r.tar_at_far[f]):>11}" for f in fars)
                    + f"{_pct(r.eer):>8}{_pct(r.auc):>8}"
                )
            for name, v in report.verification.items():
                n = v["norms"]
                lines.append(
                    f"  Feature norms ({name}): mean {n['mean']:.4g}, "
                    f"std {n['std']:.3g}, cv {n['cv']:.3f}, min "
                    f"{n['min']:.4g}, 1st pct {n['p01']:.4g}, max "
                    f"{n['max']:.4g}"
                )
                for factor, low in v["low_res"].items():
                    lines.append(
                        f"    1/{factor:g} resolution ({s['low_res_side']} "
                        f"side): mean norm {low['norms']['mean']:.4g}, "
                        f"{low['norm_ratio']:.3f}× full resolution, cv "
                        f"{low['norms']['cv']:.3f}"
                    )
        if report.identification:
            r = report.identification["result"]
            lines.append(
                f"  Identification: {r.ranks.size} probes vs "
                f"{r.num_gallery} gallery + {r.num_distractors} "
                f"distractors: rank-1 {_pct(r.rank1)}%, rank-5 "
                f"{_pct(r.rank5)}%"
            )
        lines.append("")
    return "\n".join(lines)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "PNG plots need matplotlib: pip install matplotlib "
            "(or run without plots)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_outputs(
    reports: Sequence[ModelReport],
    output_dir: str | os.PathLike,
    *,
    plots: bool = True,
    extra: dict | None = None,
) -> list[pathlib.Path]:
    """Writes results.json and the PNG plots; returns the paths written.

    Plots: `roc_<set>.png` (every model's ROC on a log-FAR axis, low
    resolution dashed), `cmc.png`, `norms_<set>.png` (norm histograms).
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"models": [r.to_dict() for r in reports]}
    if extra:
        payload.update(extra)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    written = [json_path]
    if not plots:
        return written
    plt = _import_pyplot()
    set_names = []
    for r in reports:
        set_names += [n for n in r.verification if n not in set_names]
    for set_name in set_names:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in reports:
            v = r.verification.get(set_name)
            if v is None:
                continue
            curves = [(r.model["name"], v["result"], "-")]
            curves += [
                (f"{r.model['name']} 1/{f:g}", low["result"], "--")
                for f, low in v["low_res"].items()
            ]
            for label, res, style in curves:
                c = res.roc
                keep = c.far > 0
                ax.plot(
                    c.far[keep],
                    c.tar[keep],
                    style,
                    drawstyle="steps-post",
                    label=f"{label} (AUC {100 * res.auc:.2f}%)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(f"ROC: {set_name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = output_dir / f"roc_{_safe(set_name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in reports:
            v = r.verification.get(set_name)
            if v is None:
                continue
            norms = [(r.model["name"], v["norms"])]
            norms += [
                (f"{r.model['name']} 1/{f:g}", low["norms"])
                for f, low in v["low_res"].items()
            ]
            for label, n in norms:
                h = n["histogram"]
                ax.stairs(h["counts"], h["edges"], label=label)
        ax.set_xlabel("embedding norm ‖f(x)‖₂")
        ax.set_ylabel("images")
        ax.set_title(f"Feature norms: {set_name}")
        ax.legend(fontsize=8)
        path = output_dir / f"norms_{_safe(set_name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    with_ident = [r for r in reports if r.identification]
    if with_ident:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in with_ident:
            res = r.identification["result"]
            ranks = np.arange(1, res.cmc.size + 1)
            ax.plot(
                ranks,
                100 * res.cmc,
                drawstyle="steps-post",
                label=f"{r.model['name']} (rank-1 {100 * res.rank1:.2f}%)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate (%)")
        num = with_ident[0].identification["result"].num_distractors
        ax.set_title(f"CMC: gallery + {num} distractors")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = output_dir / "cmc.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
