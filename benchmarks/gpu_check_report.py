"""How benchmarks/gpu_check.py judges and shows its results: a verdict per goal (met, or missed and by how much),
the summary table it prints, and the chart it draws."""
from __future__ import annotations

from pathlib import Path

DRY_RUN_VERDICT = "not judged (CPU dry run)"


def goal(name: str, value: float | None, target: float, at_most: bool = False, on_hardware: bool = True,
         detail: str = "") -> dict:
    """A figure held to the issue's target. `on_hardware`: a performance goal, judged on the GPU only (a test or
    a compilation count is judged in the dry run too). `name` is short (a chart label), `detail` says more."""
    if value is None:
        verdict = "not measured"
    elif value <= target if at_most else value >= target:
        verdict = "met"
    elif at_most:
        verdict = f"missed by {value - target:g}"
    else:
        verdict = f"missed by {target - value:.3g} ({100 * (1 - value / target):.0f}% short)"
    return {"goal": name, "detail": detail, "value": value, "target": target, "at_most": at_most,
            "verdict": verdict, "on_hardware": on_hardware}


def _target_text(g: dict) -> str:
    return f"{'<=' if g['at_most'] else '>='} {g['target']:g}"


def withhold_hardware_verdicts(step: dict) -> None:
    """In the dry run a performance figure says nothing about an H100: keep it, drop its verdict."""
    for g in step.get("goals", []):
        if g["on_hardware"]:
            g["verdict"] = DRY_RUN_VERDICT


def headline(name: str, figures: dict) -> str:
    """One line of the figures that matter most in a step."""
    f = figures
    if name == "tests":
        return f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped"
    if name == "kernels":
        return f"copy {f['copy_bw_gbps']:.0f} GB/s, matmul {f['matmul_tflops']:.1f} TFLOP/s, {len(f['records'])} timings"
    if name == "throughput":
        ours = f"TokModel {f['tokmodel']['output_tokens_per_s']:.0f}"
        if "speedup_useful_tokens" in f:
            return (f"{ours} vs generate_batch {f['hf_generate_batch']['output_tokens_per_s']:.0f} output tok/s "
                    f"({f['speedup_useful_tokens']:.2f}x)")
        if "speedup_useful_tokens_at_least" in f:
            return (f"{ours} vs generate_batch at most {f['hf_generate_batch_output_tokens_per_s_at_most']:.0f} "
                    f"output tok/s (at least {f['speedup_useful_tokens_at_least']:.2f}x; it did not finish)")
        return f"{ours} output tok/s; generate_batch did not reach its timed run"
    if name == "decode_latency":
        profiled = f.get("profiled")
        return (f"{f['ms_per_token_median']:.2f} ms/token, floor {f['floor_ms']:.2f} ms "
                f"({f['floor_over_actual']:.0%} of the floor's speed)"
                + (f"; device {profiled['device_ms_per_token']:.2f} ms a token" if profiled else ""))
    if name == "serving":
        return (f"{f['completed']}/{f['num_requests']} done, {f['output_tok_s']:.0f} tok/s, "
                f"TTFT mean {f['ttft_ms'].get('mean', float('nan')):.0f} ms, ITL mean {f['itl_ms'].get('mean', float('nan')):.1f} ms")
    if name == "tensor_parallel":
        if "skipped" in f:
            return f"skipped: {f['skipped']}"
        return (f"TP=2 {f['tp2_ms_per_token_median']:.2f} vs TP=1 {f['tp1_ms_per_token_median']:.2f} ms/token "
                f"({f['speedup']:.2f}x)")
    if name == "compile_stalls":
        return f"{sum(f['after_warm_up'].values())} variants after warm-up, {sum(f['new'].values())} new after"
    if name == "idle_time":
        overlapped = f.get("async_scheduling")
        return (f"batch {f['batch']}: {f['step_ms_mean']:.2f} ms a step, device busy "
                f"{f['step_split']['device_busy_pct']:.1f}%, host {f['step_split']['host_pct']:.1f}%"
                + (f"; async scheduling {overlapped['step_ms_mean']:.2f} ms, busy "
                   f"{overlapped['step_split']['device_busy_pct']:.1f}%" if overlapped else ""))
    return ""


def summary_table(report: dict) -> str:
    lines = [f"TokModel GPU check ({report['mode']}) on {report['device']}, commit {report['commit']}, {report['date']}",
             "", f"{'step':<16}{'status':<11}{'time':>7}  figures"]
    for name, step in report["steps"].items():
        detail = "; ".join(filter(None, [step.get("error"), step.get("figures") and headline(name, step["figures"])]))
        lines.append(f"{name:<16}{step['status']:<11}{step['seconds']:>6.0f}s  {detail}")
    lines += ["", f"{'goal':<42}{'value':>9}  {'target':<8}  {'verdict':<26}detail"]
    for step in report["steps"].values():
        for g in step.get("goals", []):
            value = "" if g["value"] is None else f"{g['value']:.3g}"
            lines.append(f"{g['goal']:<42}{value:>9}  {_target_text(g):<8}  {g['verdict']:<26}{g['detail']}")
    return "\n".join(lines)


def draw(report: dict, path: Path) -> str | None:
    """Decode attention's fraction of copy bandwidth by context, one line per batch; each goal's figure over its
    target; the throughput of both systems. Returns why there is no chart, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    fig, (decode_ax, goals_ax, throughput_ax) = plt.subplots(1, 3, figsize=(17, 5))
    _draw_decode(decode_ax, report["steps"].get("kernels", {}).get("figures"), report["plan"]["decode_goal_from"])
    _draw_goals(goals_ax, [g for step in report["steps"].values() for g in step.get("goals", [])])
    _draw_throughput(throughput_ax, report["steps"].get("throughput", {}).get("figures"))
    dry = " - CPU dry run: tiny sizes, not performance" if report["mode"] == "cpu-dry-run" else ""
    fig.suptitle(f"TokModel GPU check, {report['device']}, commit {report['commit']}, {report['date']}{dry}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _draw_decode(ax, figures: dict | None, goal_from: list[int]) -> None:
    ax.set_title("paged decode attention: fraction of copy bandwidth", fontsize=10)
    if not figures:
        ax.text(0.5, 0.5, "no kernel figures", ha="center", transform=ax.transAxes)
        return
    records = [r for r in figures["records"] if r["kernel"] == "paged_decode_attention"]
    for batch in sorted({r["batch"] for r in records}):
        rows = sorted((r["context_len"], r["frac_of_copy_bw"]) for r in records if r["batch"] == batch)
        ax.plot(*zip(*rows), marker="o", label=f"batch {batch}")
    ax.axhline(0.8, color="gray", linestyle="--", label=f"goal (batch {goal_from[0]}+, context {goal_from[1]}+)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"fraction of {figures['copy_bw_gbps']:.0f} GB/s")
    ax.legend(fontsize=8)


def _draw_goals(ax, goals: list[dict]) -> None:
    """Figure over target for the goals with a positive target (1 = just met), a bar each, drawn up to 2."""
    ratios = [g for g in goals if g["value"] is not None and g["target"] > 0]
    ax.set_title("goals: figure / target (1 = met)", fontsize=10)
    values = [g["value"] / g["target"] for g in ratios]
    bars = ax.barh([g["goal"] for g in ratios], [min(v, 2.0) for v in values],
                   color=["#1b9e77" if v >= 1 else "#d95f02" for v in values])
    ax.bar_label(bars, labels=[f" {g['value']:.2f} ({_target_text(g)})" for g in ratios], fontsize=8)
    ax.axvline(1.0, color="gray", linestyle="--")
    ax.set_xlim(0, 2.6)
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()


def _draw_throughput(ax, figures: dict | None) -> None:
    ax.set_title("offline throughput, Qwen3-0.6B shape", fontsize=10)
    if not figures:
        ax.text(0.5, 0.5, "no throughput figures", ha="center", transform=ax.transAxes)
        return
    values = {"TokModel": figures["tokmodel"]["output_tokens_per_s"]}
    if "speedup_useful_tokens" in figures:
        values["transformers\ngenerate_batch"] = figures["hf_generate_batch"]["output_tokens_per_s"]
        ratio = f"{figures['speedup_useful_tokens']:.2f}x"
    elif "speedup_useful_tokens_at_least" in figures:
        # It had not finished: the bar is the most it could have made.
        values["transformers\ngenerate_batch\n(unfinished: at most)"] = \
            figures["hf_generate_batch_output_tokens_per_s_at_most"]
        ratio = f"at least {figures['speedup_useful_tokens_at_least']:.2f}x"
    else:
        ratio = "generate_batch did not reach its timed run"
    bars = ax.bar(list(values), list(values.values()), color=["#d95f02", "#7570b3"][:len(values)])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("useful output tokens/s")
    workload = figures["workload"]
    ax.set_xlabel(f"{workload['num_prompts']} requests, prompts {workload['input_len']}, outputs "
                  f"{workload['output_len']} tokens: {ratio}", fontsize=9)
