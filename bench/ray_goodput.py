"""The analysis behind ``bench_ray_recovery.py``'s figures, apart from the Ray and training code that produces
them: rank 0's step timeline (from the heartbeats the driver polls), per-failure costs, the goodput MEASURED and
ACCOUNTED of the goodput phases (their definitions: ``bench_ray_recovery.py``'s docstring), the merge of earlier
results (``--combine``) and the goodput table. Pure Python: ``tests/test_bench_goodput.py`` checks it on timelines
whose costs are known, and ``--combine`` runs it without Ray or torch."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

GOODPUT_PHASES = ("goodput-regrow", "goodput-baseline", "goodput-clean")


def step_times(samples: list[tuple[float, int, float]]) -> list[list[float]]:
    """The raw timeline, compact: [step, completion time] each time rank 0's reported step changed."""
    out: list[list[float]] = []
    for _, step, done in samples:
        if not out or out[-1][0] != step:
            out.append([step, round(done, 4)])
    return out


def completions(samples: list[tuple[float, int, float]], t_from: float = -math.inf,
                t_to: float = math.inf) -> dict[int, float]:
    """Step -> completion time (median of its estimates) among the samples polled in [t_from, t_to)."""
    seen: dict[int, list[float]] = {}
    for polled, step, done in samples:
        if t_from <= polled < t_to and t_from <= done:
            seen.setdefault(step, []).append(done)
    return {step: statistics.median(times) for step, times in sorted(seen.items())}


def window_step_s(done: dict[int, float], low: int, high: int) -> tuple[float | None, int, int]:
    """Seconds per step between the first observed step >= ``low`` and the last observed <= ``high``."""
    inside = [s for s in done if low <= s <= high]
    if len(inside) < 2:
        return None, 0, 0
    a, b = inside[0], inside[-1]
    return (done[b] - done[a]) / (b - a), a, b


def span_s(done: dict[int, float], low: int, high: int) -> tuple[float | None, int, int]:
    """Seconds from the last observed step <= ``low`` to the first observed >= ``high`` (covers [low, high])."""
    before = [s for s in done if s <= low]
    after = [s for s in done if s >= high]
    if not before or not after:
        return None, 0, 0
    a, b = before[-1], after[0]
    return done[b] - done[a], a, b


def step_durations(done: dict[int, float], low: int, high: int) -> dict[str, float]:
    """The duration of each step in [low, high] whose predecessor was observed too (ms)."""
    return {str(s): round((done[s] - done[s - 1]) * 1e3, 1) for s in range(low, high + 1)
            if s in done and s - 1 in done}


def first_event(events: list[dict], name: str, t_from: float, t_to: float = math.inf) -> dict | None:
    return next((e for e in events if e["event"] == name and t_from <= e["t"] < t_to), None)


def reached_step(samples: list[tuple[float, int, float]], kill_step: int, t_from: float, t_to: float) -> int:
    """The furthest step rank 0 was seen at between a kill (at ``kill_step``) and the restore that followed."""
    return max([kill_step] + [step for polled, step, _ in samples if t_from <= polled < t_to])


def first_step_after(samples: list[tuple[float, int, float]], restored_step: int, t_restored: float,
                     t_to: float, step_s: float) -> tuple[int, float] | None:
    """The first step after a restore to ``restored_step`` (at ``t_restored``) and when it completed: the lowest
    newer step polled in ``[t_restored, t_to)``, its completion less the steps that finished between two polls
    (``step_s`` each). None when no step was observed."""
    after = [(step, done) for polled, step, done in samples
             if t_restored <= polled < t_to and done > t_restored and step > restored_step]
    if not after:
        return None
    step, done = min(after)
    return step, done - (step - restored_step - 1) * step_s


def failures(job: dict, step_s: float) -> list[dict]:
    """Per bench_kill: detection, heal, first step after the restore, steps re-done, sources."""
    events, samples = job["events"], job["samples"]
    kills = [e for e in events if e["event"] == "bench_kill"]
    out = []
    for index, kill in enumerate(kills):
        t_kill = kill["t"]
        t_next = kills[index + 1]["t"] if index + 1 < len(kills) else math.inf
        detected = first_event(events, "failure_detected", t_kill, t_next)
        aborted = first_event(events, "survivors_aborted", t_kill, t_next)
        restored = first_event(events, "restored", t_kill, t_next)
        resumed = first_event(events, "resumed", t_kill, t_next)
        replaced = [e for e in events if e["event"] == "replaced" and t_kill <= e["t"] < t_next]
        during = [e for e in events if e["event"] == "failure_during_recovery" and t_kill <= e["t"] < t_next]
        record = {"rank": kill["rank"], "kill_step": kill["step"], "kill_t": t_kill,
                  "detected_s": _since(detected, t_kill), "detected_how": detected.get("how") if detected else None,
                  "survivors_aborted_s": _since(aborted, t_kill), "replaced_s": _since(replaced[-1] if replaced
                                                                                      else None, t_kill),
                  "restored_s": _since(restored, t_kill), "resumed_s": _since(resumed, t_kill),
                  "heal_s": resumed.get("seconds") if resumed else None,
                  "restored_step": restored["step"] if restored else None,
                  "sources": restored.get("sources") if restored else None,
                  "replaced_same_node": [e.get("same_node") for e in replaced],
                  "timings": restored.get("timings") if restored else None,
                  "failures_during_recovery": len(during)}
        if restored is None or resumed is None:
            record["error"] = "no restored/resumed event after the kill"
            out.append(record)
            continue
        reached = reached_step(samples, kill["step"], t_kill, resumed["t"])
        record["reached_step"] = reached
        record["redone_steps"] = max(0, reached - restored["step"])
        # "resumed" is written when the generation is formed, with "restored": the same moment
        first = first_step_after(samples, restored["step"], resumed["t"], t_next, step_s)
        if first is not None:
            record["first_step_observed"] = first[0]
            record["downtime_s"] = round(first[1] - t_kill, 3)
        else:
            record["error"] = "no step observed after the restore"
        out.append(record)
    return out


def _since(event: dict | None, t0: float) -> float | None:
    return round(event["t"] - t0, 3) if event is not None else None


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def goodput(overhead: float, lost_s: float, period_s: float) -> float:
    return max(0.0, 1.0 - overhead) * max(0.0, 1.0 - lost_s / period_s)


def r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 2)


def analyse_goodput(args: argparse.Namespace, raw: dict) -> dict:
    """The measured figures of one goodput phase (:class:`GoodputPhase`); the goodput itself is added by
    :func:`goodput_summary`, once the reference step time is known."""
    clean_phase = raw["name"] == "goodput-clean"
    record = {"mode": ("no failure, snapshots off" if clean_phase
                       else "whole-job restart" if raw["restart"] else "healed in place"),
              "interval_s": raw["interval_s"], "duration_s": raw["duration_s"], "first_kill_s": raw["first_kill_s"],
              "save_every": args.save_every if raw["restart"] else None,
              "snapshot_every": None if raw["restart"] or clean_phase else args.snapshot_every,
              "wall_s": r3(raw["wall_s"]),
              "coordinators": len(raw["segments"]), "heartbeats": len(raw["samples"]),
              "polls_failed": raw["polls_failed"], "stop_reason": raw["stop_reason"],
              "events_path": raw["events_path"], "first_step": raw["first_step"]}
    t0 = raw["t0"]
    samples = [(polled, step, done) for polled, step, done, _ in raw["samples"]]
    record["step_times"] = step_times(samples)
    record["events"] = raw["trace"]
    if t0 is None:
        return record
    end = t0 + raw["duration_s"]
    if raw["stop_t"] is None or raw["stop_t"] < end:  # interrupted or failed before D: measured up to then
        end = max(t0, min(raw["stop_t"] if raw["stop_t"] is not None else math.inf,
                          samples[-1][0] if samples else t0))
        record["truncated"] = True
    record["measured_s"] = r3(end - t0)
    trace = raw["trace"]
    kills = [k for k in raw["kills"] if k["t"] < end]
    first_kill = kills[0]["t"] if kills else end
    # the clean step time: the steps before the first kill (the baseline: before its first save, when at least 8
    # steps precede it), less the first quarter of them (at most --warmup)
    before = {s: done for s, done in completions(samples, t_to=first_kill).items() if s >= raw["first_step"]}
    top = max(before) if before else raw["first_step"]
    where = "over D, no kill" if clean_phase else "before the first kill"
    if raw["restart"] and args.save_every - 1 - raw["first_step"] >= 8 and top >= args.save_every - 1:
        top, where = args.save_every - 1, "before the first save"
    skip = min(args.warmup, (top - raw["first_step"]) // 4)
    clean, low, high = window_step_s(before, raw["first_step"] + skip, top)
    record.update(step_ms_clean=ms(clean), clean_window=[low, high], clean_where=where,
                  step_ms_before_kill=ms(window_step_s(before, raw["first_step"] + skip, 10**9)[0]))
    fails = []
    for index, kill in enumerate(kills):
        t_next = kills[index + 1]["t"] if index + 1 < len(kills) else math.inf
        detected = first_event(trace, "failure_detected", kill["t"], t_next)
        restored = first_event(trace, "restored", kill["t"], t_next)
        formed = first_event(trace, "generation_formed", kill["t"], t_next)
        aborted = first_event(trace, "survivors_aborted", kill["t"], t_next)
        formed_t = formed["t"] if formed is not None else t_next
        reached = reached_step(samples, kill["step"], kill["t"], formed_t)
        fail = {"rank": kill["rank"], "kill_step": kill["step"], "kill_s": r3(kill["t"] - t0),
                "late_s": r3(kill["t"] - kill["planned_t"]), "detected_s": _since(detected, kill["t"]),
                "survivors_aborted_s": _since(aborted, kill["t"]),
                "unwind": aborted.get("unwind") if aborted else None,  # per survivor, from Worker.train
                "formed_s": _since(formed, kill["t"]), "reached_step": reached,
                "restored_step": restored["step"] if restored else None,
                "sources": restored.get("sources") if restored else None,
                "redone_steps": max(0, reached - restored["step"]) if restored else None}
        if formed is not None and restored is not None:
            first = first_step_after(samples, restored["step"], formed_t, t_next, clean or 0.0)
            if first is not None:
                fail["first_step_s"] = r3(first[1] - t0)
                fail["downtime_s"] = r3(first[1] - kill["t"])
        fail["recovered_within_d"] = fail.get("first_step_s") is not None and fail["first_step_s"] <= end - t0
        fails.append(fail)
    record["failures"] = fails
    # the step the training state had reached at D: the last one observed, unless D fell within a recovery (then
    # the step that recovery restored: what was trained since is re-done after D)
    recovering = bool(fails) and not fails[-1]["recovered_within_d"]
    if recovering:
        final = fails[-1]["restored_step"] if fails[-1]["restored_step"] is not None else fails[-1]["reached_step"]
    else:
        final = ([raw["first_step"]] + [s for polled, s, _ in samples if polled <= end])[-1]
    record.update(recovering_at_d=recovering, final_step=final, steps_advanced=final - raw["first_step"],
                  failures_injected=len(kills), failures_recovered=sum(f["recovered_within_d"] for f in fails),
                  steps_redone=sum(f["redone_steps"] or 0 for f in fails),
                  downtime_s_mean=r3(mean([f.get("downtime_s") for f in fails])))
    if clean:
        record["goodput_own_step"] = round(record["steps_advanced"] * clean / (end - t0), 4)
    every = (args.save_every if raw["restart"] else None if clean_phase else args.snapshot_every)
    if not clean_phase:
        record["accounted"] = lost_time(samples, t0=t0, end=end, fails=fails, every=every)
    return record


def _stored_t0(record: dict) -> float | None:
    """When an analysed phase's first step completed, from its stored ``step_times`` (the clock of its events)."""
    return next((done for step, done in record.get("step_times", []) if step == record.get("first_step")), None)


def lost_time_from_timeline(record: dict) -> dict:
    """:func:`lost_time` of an analysed phase from its stored ``step_times`` (each step's completion as first
    observed: the raw polls are not stored); {} when it lacks them."""
    t0 = _stored_t0(record)
    if t0 is None or "measured_s" not in record:
        return {}
    samples = [(done, step, done) for step, done in record["step_times"]]
    return lost_time(samples, t0=t0, end=t0 + record["measured_s"], fails=record.get("failures", []),
                     every=(record.get("save_every") if record.get("mode") == "whole-job restart"
                            else record.get("snapshot_every") or 1))  # older regrow records: every step


def backfill_aborts(record: dict) -> None:
    """Adds ``survivors_aborted_s`` to the failures of a result analysed before it was recorded, from the stored
    events (the phase's clock, as ``step_times``)."""
    t0 = _stored_t0(record)
    if t0 is None:
        return
    fails = record.get("failures", [])
    for index, fail in enumerate(fails):
        if "survivors_aborted_s" in fail:
            continue
        t_kill = t0 + fail["kill_s"]
        t_next = t0 + fails[index + 1]["kill_s"] if index + 1 < len(fails) else math.inf
        aborted = first_event(record.get("events", []), "survivors_aborted", t_kill, t_next)
        fail["survivors_aborted_s"] = _since(aborted, t_kill)


# The snapshot (save) of step s is taken in after_step of s; its copy runs during step s + 1 (after_forward on
# CUDA) and its seal and commit may still hold step s + 2: these positions carry its cost.
COST_POSITIONS = (0, 1, 2)


def lost_time(samples: list[tuple[float, int, float]], *, t0: float, end: float, fails: list[dict],
              every: int | None) -> dict:
    """Where a goodput phase's wall clock was lost, from its own step completions (the histories between kills:
    from ``t0`` to the first kill, from each restore to the next kill or D). A step's duration counts when its
    predecessor finished in the same history, which leaves out the first step after each restore (it is in the
    kill -> first step downtime). ``every``: the snapshot (save) interval; its positions ``s mod every`` in
    :data:`COST_POSITIONS` are its cost (none with ``every`` < 4: every step would carry it)."""
    starts = [t0] + [t0 + f["kill_s"] + (f["formed_s"] if f.get("formed_s") is not None else math.inf)
                     for f in fails]
    stops = [t0 + f["kill_s"] for f in fails] + [end]
    durations: list[tuple[int, float]] = []  # (step, seconds) of every counted step, history by history
    before_kill = 0
    for index, (a, b) in enumerate(zip(starts, stops)):
        done = completions(samples, a, min(b, end))
        # after a restore, the restored step's "completion" is when the rank was ready: the step after it is the
        # downtime's last part, never a counted step (whichever side of the generation's forming the poll saw it)
        restored = fails[index - 1].get("restored_step") if index else None
        floor = restored + 1 if restored is not None else -math.inf
        durations += [(s, done[s] - done[s - 1]) for s in done if s - 1 in done and s > floor]
        if index == 0:
            before_kill = len(durations)
    if len(durations) < 2:
        return {}
    costly = every is not None and every >= 4

    def plain(part: list[tuple[int, float]]) -> list[float]:  # the durations of steps at no cost position
        return [d for s, d in part if not costly or s % every not in COST_POSITIONS]

    other = plain(durations)
    if not other:
        return {}
    step_s = statistics.fmean(other)
    at_cost = [d for s, d in durations if costly and s % every in COST_POSITIONS]
    cost_s = sum(d - step_s for d in at_cost)
    # a recovery D fell in (or one never seen to end): lost from its kill to D
    downtime_s = sum(f["downtime_s"] if f.get("downtime_s") is not None and f.get("recovered_within_d", True)
                     else end - t0 - f["kill_s"] for f in fails)
    redone_s = sum(f.get("redone_steps") or 0 for f in fails) * step_s
    lost_s = downtime_s + redone_s + cost_s
    record = {"step_ms_other": ms(step_s), "steps_counted": len(durations),
              "step_ms_at_cost": ms(statistics.fmean(at_cost)) if at_cost else None,
              "cost_positions": list(COST_POSITIONS) if costly else None,
              "lost_downtime_s": r3(downtime_s), "lost_redone_s": r3(redone_s), "lost_cost_s": r3(cost_s),
              "lost_s": r3(lost_s), "goodput": round(1 - lost_s / (end - t0), 4)}
    if every is not None and not costly:  # every step (or nearly) carries the snapshot: its cost is not separable
        record.update(lost_cost_s=None, lost_s=None, goodput=None,
                      why_none=f"a snapshot (save) every {every} step(s): its cost is in the steps it is compared to")
    first, later = plain(durations[:before_kill]), plain(durations[before_kill:])
    if fails and first and later:
        record["step_after_restore_vs_before"] = round(statistics.fmean(later) / statistics.fmean(first), 4)
    return record


def goodput_summary(phases: dict[str, dict], fallback_step_ms: float | None) -> dict:
    """Adds each phase's goodput = steps advanced x reference step time / D, and their ratio.

    The reference step time is one for every phase: goodput-clean's mean step over its D (a job without failures,
    snapshots or saves, timed over the same wall clock: the GPUs' slow drift over minutes, seen at 58-62 ms a step
    within one 9-minute run on 2 x H200, is in the reference too), else goodput-baseline's clean step (snapshots
    off, before its first save, or else before its first kill), else ``fallback_step_ms`` (the baseline phase's
    clean window), else the phase's own clean step. With one reference, regrow's snapshot cost and the baseline's
    saves count as lost time, not as useful work, and the ratio is that of the steps advanced."""
    clean = phases.get("goodput-clean", {})
    baseline = phases.get("goodput-baseline", {})
    base = baseline.get("step_ms_clean")
    if clean.get("steps_advanced") and clean.get("measured_s"):
        ref = round(clean["measured_s"] * 1e3 / clean["steps_advanced"], 3)
        source = (f"goodput-clean's mean step over its D (no failure, snapshots off: {clean['steps_advanced']} "
                  f"steps in {clean['measured_s']:g} s)")
    elif base:
        ref, source = base, (f"goodput-baseline's clean step time (snapshots off, steps {baseline['clean_window'][0]}"
                             f"-{baseline['clean_window'][1]}, {baseline.get('clean_where', 'before its first kill')})")
    elif fallback_step_ms:
        ref, source = fallback_step_ms, "the baseline phase's clean window (snapshots off)"
    else:
        ref, source = None, None
    for record in phases.values():
        step_ms = ref or record.get("step_ms_clean")
        record["reference_step_ms"] = step_ms
        record["reference"] = source or "its own clean step time, before its first kill"
        record["goodput"] = (round(record["steps_advanced"] * step_ms / 1e3 / record["measured_s"], 4)
                             if step_ms and record.get("measured_s") and "steps_advanced" in record else None)
    summary = {"reference_step_ms": ref, "reference": source,
               "note": "goodput MEASURED: distinct steps advanced within D wall-clock seconds (from the first "
                       "completed step, one worker killed every T s) x the reference step time / D"}
    regrow, baseline = phases.get("goodput-regrow", {}), phases.get("goodput-baseline", {})
    if regrow.get("goodput") and baseline.get("goodput"):
        summary["goodput_ratio"] = round(regrow["goodput"] / baseline["goodput"], 3)
    return summary


def combine(paths: list[str]) -> dict:
    """The goodput phases of earlier results, the latest of each, with their summary (``--combine``)."""
    phases: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    fallback = None
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.removeprefix("RESULT ").strip()
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(result, dict) or result.get("bench") != "ray_recovery":
                continue
            fallback = result.get("baseline", {}).get("step_ms_off") or fallback
            for name in GOODPUT_PHASES:
                if name in result.get("goodput", {}):
                    phases[name] = result["goodput"][name]
                    sources[name] = {key: result.get(key) for key in ("time", "device", "world_size", "preset",
                                                                      "micro_batch", "ray", "status")}
                    sources[name]["file"] = path
    combined = {name: phases[name] for name in GOODPUT_PHASES if name in phases}
    for name, record in combined.items():
        if name != "goodput-clean" and "accounted" not in record:  # results from before the accounting
            record["accounted"] = lost_time_from_timeline(record)
            backfill_aborts(record)
    summary = goodput_summary(combined, fallback)
    setups = {json.dumps({k: v for k, v in s.items() if k in ("device", "world_size", "preset", "micro_batch")})
              for s in sources.values()}
    # goodput-clean kills nothing: only its D (and whether it was cut short) must match the others'
    schedules = {name: (f"D={r.get('duration_s')} s" if name == "goodput-clean" else
                        f"T={r.get('interval_s')} s, D={r.get('duration_s')} s, first kill at "
                        f"{r.get('first_kill_s')} s")
                 + (f", cut short at {r.get('measured_s')} s" if r.get("truncated") else "")
                 for name, r in combined.items()}
    kill_schedules = {text for name, text in schedules.items() if name != "goodput-clean"}
    durations = {r.get("measured_s") if r.get("truncated") else r.get("duration_s") for r in combined.values()}
    warnings = []
    if len(setups) > 1:
        warnings.append("the phases ran on different set-ups: " + "; ".join(sorted(setups)))
    if len(durations) > 1 or len(kill_schedules) > 1:
        warnings.append("the phases ran different schedules: "
                        + "; ".join(f"{name} {text}" for name, text in schedules.items()))
    if warnings:
        summary["warning"] = " ".join(warnings)
    combined["summary"] = summary
    combined["sources"] = sources
    return combined


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def goodput_markdown(goodput: dict, save_every: int | None = None) -> list[str]:
    """The table of the goodput phases: goodput MEASURED."""
    names = [name for name in GOODPUT_PHASES if name in goodput]
    if not names:
        return []
    summary = goodput.get("summary", {})
    some = goodput[names[0]]
    interval, duration, first = some["interval_s"], some["duration_s"], some["first_kill_s"]
    every = goodput.get("goodput-baseline", {}).get("save_every") or save_every
    ref = summary.get("reference_step_ms")
    failing = [name for name in names if name != "goodput-clean"]
    lines = [(f"Goodput MEASURED (phases {', '.join(names)}): each job trained for D = {duration:g} s of wall "
              f"clock from its first completed step"
              + (f"; {' and '.join(failing)} with a worker actor killed (`ray.kill`) every T = {interval:g} s, the "
                 f"first {first:g} s in (never rank 0, the one polled)" if failing else "")
              + ("; goodput-clean with no failure and no snapshot (the reference)." if "goodput-clean" in names
                 else ".")), ""]

    def cell(name: str, render: Callable[[dict], str]) -> str:
        record = goodput.get(name)
        if record is None:
            return "(not run)"
        try:
            return render(record)
        except (KeyError, TypeError, ValueError):
            return "-"

    def kills(record: dict) -> str:
        return ", ".join(f"{f['kill_s']:.1f} (r{f['rank']})" for f in record["failures"]) or "-"

    def reached(record: dict) -> str:
        text = f"{record['first_step']} -> {record['final_step']}"
        if record.get("recovering_at_d"):
            text += " (D fell in a recovery: the step it restored)"
        if record.get("truncated"):
            text += f" (run cut short: measured {record['measured_s']:.0f} s)"
        return text

    def gp(record: dict) -> str:
        text = pct(record.get("goodput"))
        if record is goodput.get("goodput-baseline") and summary.get("goodput_ratio") is not None:
            text += f" (regrow / baseline = {summary['goodput_ratio']:.3f})"
        return text

    def resumed_then_first(record: dict) -> str:
        parts = [f"{f['formed_s']:.2f} + {f['downtime_s'] - f['formed_s']:.2f}" for f in record["failures"]
                 if f.get("downtime_s") is not None and f.get("formed_s") is not None]
        return ", ".join(parts) or "-"

    def unwinding(record: dict) -> str:
        parts = []
        for f in record["failures"]:
            if f.get("survivors_aborted_s") is None:
                continue
            unwind = (f.get("unwind") or {}).values()
            slowest = [max((u[key] for u in unwind if key in u), default=None)
                       for key in ("error_after_abort_s", "abort_call_s", "leave_s")]
            parts.append(f"{f['survivors_aborted_s']:.2f}" + (" (" + " / ".join(fmt(v) for v in slowest) + ")"
                                                               if any(v is not None for v in slowest) else ""))
        return ", ".join(parts) or "-"

    def own_steps(record: dict) -> str:
        acc = record["accounted"]
        costly = f" / {fmt(acc['step_ms_at_cost'])}" if acc.get("step_ms_at_cost") is not None else ""
        return f"{fmt(acc['step_ms_other'])}{costly}"

    def lost(record: dict) -> str:
        acc = record["accounted"]
        if acc.get("lost_s") is None:
            return f"{acc['lost_downtime_s']:.2f} + {acc['lost_redone_s']:.2f} + ? (not separable)"
        return (f"{acc['lost_downtime_s']:.2f} + {acc['lost_redone_s']:.2f} + {acc['lost_cost_s']:.2f} = "
                f"{acc['lost_s']:.2f}")

    def accounted(record: dict) -> str:
        acc = record["accounted"]
        return pct(acc["goodput"]) if acc.get("goodput") is not None else f"- ({acc.get('why_none', 'no timeline')})"

    def after_restore(record: dict) -> str:
        ratio = record["accounted"].get("step_after_restore_vs_before")
        return "-" if ratio is None else f"{ratio:.4f}"

    rows = [
        ("failures injected / recovered within D",
         lambda r: f"{r['failures_injected']} / {r['failures_recovered']}"),
        ("kills, s after the first step (rank)", kills),
        ("jobs started (1 + whole-job restarts)", lambda r: str(r["coordinators"])),
        ("clean step ms (steps observed: before the first kill; baseline: before its first save; clean: all)",
         lambda r: f"{fmt(r['step_ms_clean'])} ({r['clean_window'][0]}-{r['clean_window'][1]})"),
        ("first step -> step reached at D", reached),
        ("steps advanced within D (re-done steps counted once)", lambda r: str(r["steps_advanced"])),
        ("steps re-done (since the snapshot / checkpoint restored)", lambda r: str(r["steps_redone"])),
        ("mean kill -> first step after the restore, s", lambda r: fmt(r["downtime_s_mean"])),
        ("each: kill -> restored and resumed + the first step after it, s", resumed_then_first),
        ("each: survivors aborted, s (slowest survivor: error after the abort request / NCCL abort call / leaving "
         "the group)", unwinding),
        (f"**goodput MEASURED** (steps advanced x {fmt(ref)} ms / D)" if ref else
         "**goodput MEASURED** (steps advanced x its own clean step / D)", gp),
        ("its own steps: mean ms at the other positions / at the snapshot (save) positions", own_steps),
        ("lost s: kill -> first step + steps re-done + snapshot (save) positions' excess", lost),
        ("mean step after the first restore / before the first kill", after_restore),
        ("**goodput ACCOUNTED** (1 - lost s / D, its own clock only)", accounted),
    ]
    snapshot_every = goodput.get("goodput-regrow", {}).get("snapshot_every") or 1  # older results: every step
    snapshots = "snapshot every step" if snapshot_every == 1 else f"snapshot every {snapshot_every} steps"
    titles = {"goodput-regrow": f"goodput-regrow: {snapshots}, healed in place",
              "goodput-baseline": (f"goodput-baseline: checkpoint every {every} steps, whole-job restart" if every
                                   else "goodput-baseline: checkpoints, whole-job restart"),
              "goodput-clean": "goodput-clean: no failure, snapshots off"}
    columns = [name for name in GOODPUT_PHASES if name != "goodput-clean" or name in goodput]
    lines.append("| | " + " | ".join(titles[name] for name in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    lines += [f"| {title} | " + " | ".join(cell(name, render) for name in columns) + " |" for title, render in rows]
    lines.append("")
    lines.append(f"Goodput MEASURED = distinct steps advanced within D x the reference step time / D; reference: "
                 f"{summary.get('reference') or 'each phase its own clean step time (before its first kill)'}. One "
                 f"reference for every phase: regrow's snapshot cost and the baseline's saves count as lost time, "
                 f"and the ratio is that of the steps advanced. Goodput ACCOUNTED = 1 - the lost seconds within D "
                 f"added up from the phase's own step completions (kill -> first step after the restore; steps "
                 f"re-done x its mean step at the other positions; the excess over that mean of the steps at the "
                 f"snapshot (save) positions, s mod N in {'-'.join(map(str, (COST_POSITIONS[0], COST_POSITIONS[-1])))}"
                 f"): no other run's clock enters it; left out are a step time that changes after a restore (the row "
                 f"above it) and any cost spread over every step (on the CPU, the copy thread's).")
    if summary.get("warning"):
        lines.append(f"Warning: {summary['warning']}")
    return lines


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
