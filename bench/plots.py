"""PNG charts of serving runs (matplotlib, the `bench` extra): one run's latency distributions and output tokens
per second over time; a sweep's throughput against latency, one line per endpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.endpoint import RequestFuncOutput
from bench.metrics import per_second


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'tokmodel[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: dict, outputs: list[RequestFuncOutput], path: Path) -> list[Path]:
    """<path stem>-latency.png (TTFT, TPOT, ITL histograms) and <path stem>-throughput.png (output tokens and
    requests in flight per second)."""
    plt = _pyplot()
    ok = [o for o in outputs if o.success]
    lens = [n for o, n in zip(outputs, result["output_lens"]) if o.success]
    samples = {"TTFT": [o.ttft for o in ok],
               "TPOT (excl. 1st token)": [(o.latency - o.ttft) / (n - 1) for o, n in zip(ok, lens) if n > 1],
               "ITL": [itl for o in ok for itl in o.itl]}
    title = f"{result['base_url']} {result['model_id']}, {result['request_rate']} req/s, {result['completed']} ok"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, seconds) in zip(axes, samples.items()):
        ax.hist(np.asarray(seconds) * 1000, bins=40, color="#1b9e77")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("count")
    fig.suptitle(title, fontsize=9)
    paths = [_save(fig, path.with_name(path.stem + "-latency.png"))]
    tokens, concurrent = per_second(outputs)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(np.arange(len(tokens)), tokens, color="#d95f02", label="output tokens/s")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("output tokens/s")
    twin = ax.twinx()
    twin.plot(np.arange(len(concurrent)), concurrent, color="#7570b3", linestyle="--", label="requests in flight")
    twin.set_ylabel("requests in flight")
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    paths.append(_save(fig, path.with_name(path.stem + "-throughput.png")))
    return paths


def plot_sweep(results: list[dict], path: Path) -> Path:
    """Output tokens/s against mean TTFT and mean TPOT, a line per endpoint, each point labelled with its rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for base_url in dict.fromkeys(r["base_url"] for r in results):
        runs = [r for r in results if r["base_url"] == base_url]
        for ax, metric in zip(axes, ("ttft", "tpot")):
            key = f"mean_{metric}_ms"
            ax.plot([r["output_throughput"] for r in runs], [r.get(key, np.nan) for r in runs], marker="o",
                    label=base_url)
            for r in runs:
                ax.annotate(f"{r['request_rate']:g}", (r["output_throughput"], r.get(key, np.nan)), fontsize=7)
            ax.set_xlabel("output tokens/s")
            ax.set_ylabel(f"mean {metric.upper()} (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle("throughput against latency; points labelled with the request rate (req/s)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
