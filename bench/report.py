#!/usr/bin/env python3
"""Aggregate bench/run.sh measurements into JSON + a text table + markdown.

usage: report.py MEASUREMENTS.jsonl OUT.json OUT.md

Each figure is the median over repetitions with its min-max; ratios are taken
per repetition (targets ran side by side) and summarised the same way.  Only
the standard library is used.
"""
import json
import os
import statistics
import sys

# asiffs: the ASIF image on an asiffs mount over FUSE over io_uring (-o uring=on);
# classic: the same on fuser's /dev/fuse loop (-o uring=off);
# udrw: a raw .dmg on an asiffs mount, served through FUSE passthrough
TARGETS = ["native", "asiffs", "classic", "udrw", "nbd", "qsd"]
DAEMONS = ["asiffs", "classic", "udrw", "nbd", "qsd"]   # targets with a server process whose CPU is counted
# per-job ratio columns: (key, numerator, denominator, column header)
RATIOS = [
    ("asiffs_vs_native", "asiffs", "native", "asiffs/native"),
    ("asiffs_vs_classic", "asiffs", "classic", "ring/classic"),
    ("classic_vs_native", "classic", "native", "classic/native"),
    ("udrw_vs_native", "udrw", "native", "udrw/native"),
    ("asiffs_vs_qsd", "asiffs", "qsd", "asiffs/qsd"),
    ("nbd_vs_native", "nbd", "native", "nbd/native"),
    ("nbd_vs_asiffs", "nbd", "asiffs", "nbd/asiffs"),
]
MODES = ["cold", "warm"]

# table rows: (job, figure, unit, description); "higher" unless the unit is a latency
ROWS = [
    ("fill", "bw", "MB/s", "seq write 1M qd16, first pass over the fresh file (prefill, allocating)"),
    ("seqwrite", "bw", "MB/s", "seq write 1M qd16 (overwrite)"),
    ("seqread", "bw", "MB/s", "seq read 1M qd16"),
    ("randwrite", "iops", "IOPS", "rand write 4k qd32"),
    ("randread", "iops", "IOPS", "rand read 4k qd32"),
    ("qd1read", "iops", "IOPS", "rand read 4k qd1"),
    ("qd1read", "clat_p99", "us", "rand read 4k qd1: p99 completion latency (fio clat)"),
    ("qd1read", "lat_p99", "us", "rand read 4k qd1: p99 total latency (submit + completion)"),
    ("bufwrite", "bw", "MB/s", "seq write 1M buffered + end_fsync, 1 pass"),
    ("bufread", "bw", "MB/s", "seq read 1M buffered, 1 pass"),
    ("mixed", "iops", "IOPS", "randrw 70/30 16k qd16 fsync=64"),
]

# (mode, job, figure, against, op, threshold, note): asiffs (the mount, on the
# ring) against the others; the targets of the issue.  The baseline for
# random I/O and QD1 latency is native O_DIRECT, i.e. the cold mode; the warm
# lines are printed too, against native buffered (a page-cache copy), with a
# note.  Warm QD1 uses the total latency: buffered libaio completes native's
# read inside io_submit, so its clat is ~1 us (see bench/README.md).
WARM_NOTE = "warm: native is buffered (page cache), the issue's baseline is O_DIRECT (cold)"
RATIO_CHECKS = [
    ("cold", "randread", "iops", "native", ">=", 0.8, None),
    ("cold", "randread", "iops", "qsd", ">=", 2.0, None),
    ("cold", "randwrite", "iops", "native", ">=", 0.8, None),
    ("cold", "randwrite", "iops", "qsd", ">=", 2.0, None),
    ("cold", "seqread", "bw", "native", ">=", 0.9, None),
    ("cold", "seqwrite", "bw", "native", ">=", 0.9, None),
    ("cold", "qd1read", "clat_p99", "native", "<=", 1.5, None),
    ("warm", "randread", "iops", "native", ">=", 0.8, WARM_NOTE),
    ("warm", "randread", "iops", "qsd", ">=", 2.0, None),
    ("warm", "randwrite", "iops", "native", ">=", 0.8, WARM_NOTE),
    ("warm", "randwrite", "iops", "qsd", ">=", 2.0, None),
    ("warm", "seqread", "bw", "native", ">=", 0.9, None),
    ("warm", "seqwrite", "bw", "native", ">=", 0.9, None),   # the issue's: warm 1M write vs native buffered
    ("warm", "qd1read", "lat_p99", "native", "<=", 1.5, WARM_NOTE + "; total latency (clat of buffered native is ~0)"),
]
# (mode, job, figure, op, threshold) on nbd/asiffs: the NBD export (fio's nbd
# engine, one connection) should beat the mount by 1.2x on 4 KiB random I/O
NBD_CHECKS = [
    (mode, job, "iops", ">=", 1.2) for mode in ("cold", "warm") for job in ("randread", "randwrite")
]
RSS_MAX_MIB = 64   # peak RSS of the mount daemon

# udrw/native, in every job of every mode run (the job's throughput figure):
# passthrough leaves the kernel alone with the .dmg, so it should be native's
UDRW_MIN = 0.95

MIB = 1024 * 1024
GIB = 1024 * MIB


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def spread(xs):
    """median, min, max and count of the values that exist, or None."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "runs": xs}


def load_fio(path):
    with open(path) as f:
        text = f.read()
    # fio sometimes prefixes notes before the JSON document
    return json.loads(text[text.index("{"):])


def p99(lat):
    pct = (lat or {}).get("percentile") or {}
    v = pct.get("99.000000")
    return v / 1000.0 if v is not None else None


def fio_figures(doc):
    """bw (MB/s), iops, bytes moved and p99 latencies (us) of a one-job fio run."""
    job = doc["jobs"][0]
    if job.get("error"):
        return None
    f = {"bw": 0.0, "iops": 0.0, "bytes": 0, "clat_p99": None, "lat_p99": None}
    for d in ("read", "write", "trim"):
        part = job.get(d) or {}
        f["bw"] += part.get("bw_bytes", 0) / 1e6
        f["iops"] += part.get("iops", 0)
        f["bytes"] += part.get("io_bytes", 0)
        if part.get("io_bytes") and f["clat_p99"] is None:
            f["clat_p99"] = p99(part.get("clat_ns"))
            f["lat_p99"] = p99(part.get("lat_ns"))
    return f


def fmt(v, unit=None):
    if v is None:
        return "n/a"
    if unit == "ratio":
        return f"{v:.2f}x"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_sp(sp, unit=None):
    """median, and (min-max) when there is more than one run"""
    if sp is None:
        return "n/a"
    if sp["n"] == 1:
        return fmt(sp["median"], unit)
    return f"{fmt(sp['median'], unit)} ({fmt(sp['min'], unit)}-{fmt(sp['max'], unit)})"


def main():
    meas_path, out_json, out_md = sys.argv[1:4]
    rows = []
    with open(meas_path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    config = next((r for r in rows if r["kind"] == "config"), {})

    # ---- fio jobs: (mode, job, target) -> {rep: figures}
    per = {}
    errors = []
    for r in rows:
        mode = r.get("mode", "cold")   # runs before the modes existed dropped caches
        if r["kind"] == "fio_error":
            errors.append(f"fio {r['job']} on {r['target']} ({mode}) failed in rep {r['rep']}")
        if r["kind"] != "fio":
            continue
        try:
            fig = fio_figures(load_fio(r["file"]))
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"cannot parse {r['file']}: {e}")
            continue
        if fig is None:
            errors.append(f"fio {r['job']} on {r['target']} ({mode}) reported an error in rep {r['rep']}")
            continue
        ticks, tck = r.get("cpu_ticks"), r.get("clk_tck")
        fig["cpu_s"] = ticks / tck if ticks is not None and tck else None
        fig["cpu_s_per_gib"] = (fig["cpu_s"] / (fig["bytes"] / GIB)
                                if fig["cpu_s"] is not None and fig["bytes"] else None)
        per.setdefault((mode, r["job"], r["target"]), {})[r["rep"]] = fig

    def paired(mode, job, fig, a, b):
        """per-repetition ratios a/b: the targets ran side by side in each repetition"""
        ra, rb = per.get((mode, job, a), {}), per.get((mode, job, b), {})
        return spread([ratio(ra[k][fig], rb[k][fig]) for k in sorted(ra) if k in rb])

    modes = {}
    for mode in MODES:
        if not any(k[0] == mode for k in per):
            continue
        table = []
        for job, fig, unit, desc in ROWS:
            if not any((mode, job, t) in per for t in TARGETS):
                continue
            e = {"job": job, "figure": fig, "unit": unit, "desc": desc}
            for t in TARGETS:
                e[t] = spread([x[fig] for x in per.get((mode, job, t), {}).values()])
            for key, a, b, _ in RATIOS:
                e[key] = paired(mode, job, fig, a, b)
            table.append(e)
        cpu = []
        for job in dict.fromkeys(j for j, _, _, _ in ROWS):
            if not any((mode, job, t) in per for t in DAEMONS):
                continue
            c = {"job": job}
            for t in DAEMONS:
                c[t] = spread([x["cpu_s_per_gib"] for x in per.get((mode, job, t), {}).values()])
            c["asiffs_vs_qsd"] = paired(mode, job, "cpu_s_per_gib", "asiffs", "qsd")
            c["asiffs_vs_classic"] = paired(mode, job, "cpu_s_per_gib", "asiffs", "classic")
            c["nbd_vs_qsd"] = paired(mode, job, "cpu_s_per_gib", "nbd", "qsd")
            cpu.append(c)
        modes[mode] = {
            "settings": {
                "native_direct": config.get(f"native_direct_{mode}"),
                "asiffs_cache": config.get(f"asiffs_cache_{mode}"),
                "asiffs_uring": config.get("asiffs_uring"),
                "classic_uring": config.get("classic_uring"),
                "qsd_cache_direct": config.get(f"qsd_cache_direct_{mode}"),
                "nbd_cache": config.get(f"nbd_cache_{mode}"),
            },
            "jobs": table,
            "cpu_s_per_gib": cpu,
        }

    # ---- discard
    discard = {}
    for t in TARGETS:
        rs = [r for r in rows if r["kind"] == "discard" and r["target"] == t]
        if not rs:
            continue
        ok = [r for r in rs if "error" not in r]
        d = {"runs": len(rs), "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            d["time_s"] = med([r["time_s"] for r in ok])
            d["punched_bytes"] = med([r["punched"] for r in ok])
            d["alloc_before_bytes"] = med([r["before"] for r in ok])
            d["alloc_after_bytes"] = med([r["after"] for r in ok])
            d["freed_bytes"] = med([r["before"] - r["after"] for r in ok
                                    if r["before"] is not None and r["after"] is not None])
            if d["freed_bytes"] is not None and d["punched_bytes"]:
                d["freed_fraction_of_punched"] = d["freed_bytes"] / d["punched_bytes"]
        discard[t] = d

    final = {}
    for t in TARGETS:
        xs = [r["bytes"] for r in rows if r["kind"] == "container_final" and r["target"] == t]
        if xs:
            final[t] = med(xs)

    # ---- extras
    rss = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss" and r["vmhwm_kib"] is not None]
    rss_qsd = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss_qsd" and r["vmhwm_kib"] is not None]
    rss_nbd = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss_nbd" and r["vmhwm_kib"] is not None]
    rss_udrw = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss_udrw" and r["vmhwm_kib"] is not None]
    rss_classic = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss_classic" and r["vmhwm_kib"] is not None]
    classic_rss_mib = max(rss_classic) / 1024 if rss_classic else None
    udrw_rss_mib = max(rss_udrw) / 1024 if rss_udrw else None
    nbd_rss_mib = max(rss_nbd) / 1024 if rss_nbd else None
    peak_rss_mib = max(rss) / 1024 if rss else None
    qsd_rss_mib = max(rss_qsd) / 1024 if rss_qsd else None

    mm = [r.get("ms") for r in rows if r["kind"] == "mount_many"]
    mount_many = {"images": config.get("many"), "runs_ms": mm, "median_ms": med(mm)} if mm else None

    big = next((r for r in rows if r["kind"] == "big_image"), None)
    ob = [r for r in rows if r["kind"] == "open_big"]
    info_w = [r["ms"] for r in rows if r["kind"] == "info_warm"]
    info_c = [r["ms"] for r in rows if r["kind"] == "info_cold"]
    hf = next((r for r in rows if r["kind"] == "info_hyperfine"), None)
    hf_ms = None
    if hf:
        try:
            with open(hf["file"]) as f:
                hf_ms = json.load(f)["results"][0]["median"] * 1000
        except (OSError, ValueError, KeyError, IndexError):
            pass
    open_big = None
    if big or ob or info_w:
        open_big = {
            "virtual": config.get("big"),
            "mapped_chunks": config.get("bigchunks"),
            "container_alloc_bytes": big and big["bytes"],
            "fill_s": big and big["fill_s"],
            "fresh_mount_ms": med([r["mount_ms"] for r in ob]),
            "open_ms": med([r["open_us"] / 1000 for r in ob]),
            "open_first_read_ms": med([r["open_read_us"] / 1000 for r in ob]),
            "info_warm_ms": med(info_w),
            "info_cold_ms": med(info_c),
            "info_hyperfine_median_ms": hf_ms,
            "runs": len(ob),
        }

    conv = {}
    for tool in ("asiffs", "qemu"):
        rs = [r for r in rows if r["kind"] == "convert" and r["tool"] == tool]
        if rs:
            s = med([r["s"] for r in rs])
            conv[tool] = {"median_s": s, "runs_s": [r["s"] for r in rs],
                          "MBps": rs[0]["in_bytes"] / 1e6 / s if s else None,
                          "out_alloc_bytes": med([r["out_alloc"] for r in rs])}

    # ---- the cache mode and FUSE transport the mounts report (`asiffs stats`),
    # against what the harness asked for: asiffs on the ring, classic on /dev/fuse
    cache_seen, transport_seen = {}, {}
    want_transport = {"asiffs": "uring" if config.get("asiffs_uring") == "uring=on" else None,
                      "classic": "classic" if config.get("classic_uring") == "uring=off" else None}
    for r in rows:
        if r["kind"] != "asiffs_stats":
            continue
        t = r.get("target", "asiffs")
        try:
            with open(r["file"]) as f:
                imgs = [v for v in json.load(f).values() if isinstance(v, dict)]
        except (OSError, ValueError, AttributeError):
            continue
        seen = {v.get("cache") for v in imgs} - {None}
        tr = {v.get("transport") for v in imgs} - {None}
        cache_seen.setdefault((r["mode"], t), set()).update(seen)
        transport_seen.setdefault((r["mode"], t), set()).update(tr)
        wanted = (config.get(f"asiffs_cache_{r['mode']}") or "").split(" ")[0]
        if seen and seen != {wanted}:
            errors.append(f"{t} stats says cache={'/'.join(sorted(seen))} in the {r['mode']} mode "
                          f"(rep {r['rep']}), the harness expected {wanted}")
        wt = want_transport.get(t)
        if wt and tr != {wt}:
            errors.append(f"{t} stats says transport={'/'.join(sorted(tr)) or 'not reported'} in the "
                          f"{r['mode']} mode (rep {r['rep']}), the harness asked for {wt}")
    for mode, m in modes.items():
        m["settings"]["asiffs_cache_seen"] = sorted(cache_seen.get((mode, "asiffs"), []))
        m["settings"]["classic_cache_seen"] = sorted(cache_seen.get((mode, "classic"), []))
        m["settings"]["asiffs_transport_seen"] = sorted(transport_seen.get((mode, "asiffs"), []))
        m["settings"]["classic_transport_seen"] = sorted(transport_seen.get((mode, "classic"), []))

    # ---- was udrw served by passthrough?  (`asiffs stats` after the fill and at each mode's end)
    udrw_seen = [{k: r.get(k) for k in ("rep", "mode", "at", "passthrough", "reads", "transport")}
                 for r in rows if r["kind"] == "udrw_stats"]
    udrw_pt = None
    if udrw_seen:
        pts = [x["passthrough"] for x in udrw_seen]
        udrw_pt = {"passthrough": (True if all(v is True for v in pts)
                                   else False if any(v is False for v in pts) else None),
                   "max_reads": max((x["reads"] for x in udrw_seen if x["reads"] is not None), default=None),
                   "transport": sorted({x["transport"] for x in udrw_seen if x.get("transport")}),
                   "samples": udrw_seen}

    # ---- PASS/MISS checks (on medians; the spread is shown beside)
    checks = []

    def check(name, value, op, threshold, unit="", sp=None, note=None):
        if value is None:
            st = "N/A"
        elif op == ">=":
            st = "PASS" if value >= threshold else "MISS"
        elif op == "<=":
            st = "PASS" if value <= threshold else "MISS"
        elif op == ">":
            st = "PASS" if value > threshold else "MISS"
        else:
            st = "PASS" if value < threshold else "MISS"
        c = {"name": name, "value": value, "op": op, "threshold": threshold,
             "unit": unit, "status": st}
        if sp is not None:
            c["min"], c["max"], c["n"] = sp["min"], sp["max"], sp["n"]
        if note:
            c["note"] = note
        checks.append(c)

    def row(mode, job, fig):
        for e in modes.get(mode, {}).get("jobs", []):
            if e["job"] == job and e["figure"] == fig:
                return e
        return {}

    labels = {"bw": "1M MB/s", "iops": "IOPS", "clat_p99": "4k qd1 p99 clat",
              "lat_p99": "4k qd1 p99 lat"}
    def skipped(mode):
        return f"{mode} mode skipped, see NOTE" if mode not in modes and config.get("modes_note") else None

    # grouped by mode: every check of cold, then every check of warm, then the rest
    for mode in MODES:
        if mode not in modes and not skipped(mode) and mode != "cold":
            continue   # warm not asked for: no N/A lines for it
        for m_, job, fig, other, op, thr, note in RATIO_CHECKS:
            if m_ != mode:
                continue
            sp = row(mode, job, fig).get(f"asiffs_vs_{other}")
            check(f"{mode} {job} {labels[fig]} asiffs(ring)/{other}", sp and sp["median"], op, thr, "x", sp,
                  skipped(mode) or note)
        for m_, job, fig, op, thr in NBD_CHECKS:
            if m_ != mode:
                continue
            sp = row(mode, job, fig).get("nbd_vs_asiffs")
            check(f"{mode} {job} 4k {labels[fig]} nbd/asiffs(ring) (export beats the mount)", sp and sp["median"],
                  op, thr, "x", sp, skipped(mode))
        # udrw/native on each job's throughput figure; cold always listed (N/A if not run)
        if mode in modes:
            jobs = [(e["job"], e["figure"], e["unit"], e.get("udrw_vs_native"))
                    for e in modes[mode]["jobs"] if e["figure"] in ("bw", "iops")]
        elif mode == "cold":
            first = {j: (f, u) for j, f, u, _ in reversed(ROWS)}
            names = ["fill"] + (config.get("cold_jobs") or "").split()
            jobs = [(j, *first[j], None) for j in names if j in first]
        else:
            jobs = []
        for job, fig, unit, sp in jobs:
            check(f"{mode} {job} {unit} udrw/native", sp and sp["median"], ">=", UDRW_MIN, "x", sp,
                  skipped(mode))
        # the worst job decides: CPU per GiB must not exceed qsd's in any of them
        worst = None
        for c in modes.get(mode, {}).get("cpu_s_per_gib", []):
            sp = c["asiffs_vs_qsd"]
            if sp and (worst is None or sp["median"] > worst[1]["median"]):
                worst = (c["job"], sp)
        check(f"{mode} CPU s/GiB asiffs/qsd, worst job" + (f" ({worst[0]})" if worst else ""),
              worst and worst[1]["median"], "<=", 1.0, "x", worst and worst[1], skipped(mode))
    check("asiffs(ring) mount daemon peak RSS (VmHWM)", peak_rss_mib, "<=", RSS_MAX_MIB, "MiB")
    if "classic" in (config.get("targets") or "").split():
        check("classic mount daemon peak RSS (VmHWM)", classic_rss_mib, "<=", RSS_MAX_MIB, "MiB")
    check(f"mount {config.get('many')} images", mount_many and mount_many["median_ms"], "<", 1000, "ms")
    check(f"open {config.get('big')} image: open+1st read, fresh mount",
          open_big and open_big["open_first_read_ms"], "<", 10, "ms")
    check(f"open {config.get('big')} image: asiffs info (cold)",
          open_big and open_big["info_cold_ms"], "<", 10, "ms")
    cr = None
    if "asiffs" in conv and "qemu" in conv:
        cr = conv["qemu"]["median_s"] / conv["asiffs"]["median_s"]
    check("convert speed asiffs/qemu-img qcow2", cr, ">=", 1.0, "x")

    result = {
        "config": config,
        "modes": modes,
        "discard": discard,
        "container_final_alloc_bytes": final,
        "asiffs_peak_rss_mib": peak_rss_mib,
        "qsd_peak_rss_mib": qsd_rss_mib,
        "nbd_peak_rss_mib": nbd_rss_mib,
        "udrw_peak_rss_mib": udrw_rss_mib,
        "classic_peak_rss_mib": classic_rss_mib,
        "udrw_passthrough": udrw_pt,
        "mount_many": mount_many,
        "open_big": open_big,
        "convert": conv,
        "convert_speed_ratio": cr,
        "checks": checks,
        "errors": errors,
        "elapsed_s": next((r["s"] for r in rows if r["kind"] == "elapsed"), None),
    }
    tmp = out_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out_json)

    # ---- text + markdown
    def render(hdr, body, left=2):
        """aligned text lines and markdown lines of one table"""
        widths = [max(len(r[i]) for r in [hdr] + body) for i in range(len(hdr))]
        text = []
        for k, r in enumerate([hdr] + body):
            text.append("  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i])
                                  for i, c in enumerate(r)))
            if k == 0:
                text.append("  ".join("-" * w for w in widths))
        md = ["| " + " | ".join(hdr) + " |",
              "|" + "|".join(["---"] * left + ["---:"] * (len(hdr) - left)) + "|"]
        md += ["| " + " | ".join(r) + " |" for r in body]
        return text, md

    how = {
        "cold": "cold: sync + drop_caches before each job",
        "warm": "warm: sync, then one read pass over the working set, before each job (no drop)",
    }
    sections = []   # (title, text lines, md lines)
    for mode, m in modes.items():
        st = m["settings"]
        seen = "/".join(st["asiffs_cache_seen"]) or "not reported"
        trs = "/".join(st["asiffs_transport_seen"]) or "not reported"
        trc = "/".join(st["classic_transport_seen"]) or "not reported"
        title = (f"{how[mode]}; native direct={st['native_direct']}, asiffs cache={st['asiffs_cache']} "
                 f"(asiffs stats: {seen}), asiffs transport {st['asiffs_uring'] or 'default'} "
                 f"(stats: {trs}), classic = asiffs on /dev/fuse, {st['classic_uring'] or 'n/a'} "
                 f"(stats: {trc}), udrw (.dmg, passthrough) as asiffs with the default transport, "
                 f"nbd (asiffs serve) cache={st['nbd_cache']}, "
                 f"qsd cache.direct={st['qsd_cache_direct']}; fio opens asiffs, classic, udrw and qsd files direct=1 "
                 f"(bufwrite/bufread: direct=0 there), nbd through fio's nbd engine (libnbd, "
                 f"no client cache; psync jobs run at iodepth 1). median (min-max) over runs; "
                 f"ratios are per-run pairs")
        hdr = ["job", "unit"] + TARGETS + [h for _, _, _, h in RATIOS]
        body = []
        for e in m["jobs"]:
            name = e["job"] if e["figure"] in ("bw", "iops") else f"{e['job']} {e['figure'].replace('_', ' ')}"
            body.append([name, e["unit"]] + [fmt_sp(e[t]) for t in TARGETS]
                        + [fmt_sp(e.get(k), "ratio") for k, _, _, _ in RATIOS])
        sections.append((title, *render(hdr, body)))
        if m["cpu_s_per_gib"]:
            body = [[c["job"]] + [fmt_sp(c[t]) for t in DAEMONS]
                    + [fmt_sp(c["asiffs_vs_qsd"], "ratio"), fmt_sp(c["asiffs_vs_classic"], "ratio"),
                       fmt_sp(c["nbd_vs_qsd"], "ratio")]
                    for c in m["cpu_s_per_gib"]]
            sections.append((f"{mode}: daemon CPU seconds (utime+stime) per GiB moved (fio io_bytes)",
                             *render(["job"] + DAEMONS + ["asiffs/qsd", "ring/classic", "nbd/qsd"], body, left=1)))
    if discard:
        body = []
        for key, label, unit, scale in (("time_s", "discard 50% time", "s", 1),
                                        ("alloc_before_bytes", "discard alloc before", "MiB", MIB),
                                        ("alloc_after_bytes", "discard alloc after", "MiB", MIB)):
            vals = {t: (discard.get(t, {}).get(key)) for t in TARGETS}
            vals = {t: (v / scale if v is not None else None) for t, v in vals.items()}
            body.append([label, unit] + [fmt(vals[t]) for t in TARGETS]
                        + [fmt(ratio(vals["asiffs"], vals["native"]), "ratio"),
                           fmt(ratio(vals["asiffs"], vals["qsd"]), "ratio"),
                           fmt(ratio(vals["nbd"], vals["asiffs"]), "ratio")])
        sections.append(("discard (medians; after the last mode's jobs; nbd: NBD TRIM via fio)",
                         *render(["figure", "unit"] + TARGETS + ["asiffs/native", "asiffs/qsd", "nbd/asiffs"],
                                 body)))

    cfg = (f"size={config.get('size')} runs={config.get('runs')} runtime={config.get('runtime')}s "
           f"ramp={config.get('ramp')}s modes={config.get('modes')!r} quick={config.get('quick')} "
           f"asiffs={config.get('asiffs_rev')} "
           + (f"(binary built {config['asiffs_bin_mtime']}, sha256 {config.get('asiffs_bin_sha256')}) "
              if config.get("asiffs_bin_mtime") else "")
           + f"kernel={config.get('kernel')} nproc={config.get('nproc')}")
    extra = []
    extra.append(f"asiffs (ring) peak RSS (VmHWM, max over reps): {fmt(peak_rss_mib)} MiB"
                 f"   (classic mount: {fmt(classic_rss_mib)} MiB, "
                 f"udrw mount: {fmt(udrw_rss_mib)} MiB, nbd serve: {fmt(nbd_rss_mib)} MiB, "
                 f"qsd: {fmt(qsd_rss_mib)} MiB)")
    if udrw_pt:
        pt = {True: "yes", False: "NO", None: "not reported"}[udrw_pt["passthrough"]]
        extra.append(f"udrw through FUSE passthrough (asiffs stats, {len(udrw_pt['samples'])} samples): {pt}; "
                     f"reads that reached the daemon: at most {udrw_pt['max_reads'] if udrw_pt['max_reads'] is not None else 'n/a'}; "
                     f"transport: {'/'.join(udrw_pt['transport']) or 'not reported'}")
    if mount_many:
        extra.append(f"mount {mount_many['images']} images: median {fmt(mount_many['median_ms'])} ms "
                     f"(runs: {', '.join(fmt(x) for x in mount_many['runs_ms'])})")
    if open_big:
        ca = open_big["container_alloc_bytes"]
        extra.append(
            f"{open_big['virtual']} image, {open_big['mapped_chunks']} mapped chunks "
            f"(container {fmt(ca / MIB if ca else None)} MiB allocated): fresh mount "
            f"{fmt(open_big['fresh_mount_ms'])} ms, open {fmt(open_big['open_ms'])} ms, "
            f"open+1st read {fmt(open_big['open_first_read_ms'])} ms; asiffs info warm "
            f"{fmt(open_big['info_warm_ms'])} ms / cold {fmt(open_big['info_cold_ms'])} ms"
            + (f" (hyperfine {fmt(hf_ms)} ms)" if hf_ms else ""))
    for tool, c in conv.items():
        extra.append(f"convert {config.get('convert_size')} (~50% data) with {tool}: median "
                     f"{fmt(c['median_s'])} s = {fmt(c['MBps'])} MB/s, output "
                     f"{fmt(c['out_alloc_bytes'] / MIB if c['out_alloc_bytes'] else None)} MiB")
    notes = [config["modes_note"]] if config.get("modes_note") else []

    def vu(c):
        if c["value"] is None:
            return "n/a"
        v = f"{fmt(c['value'])}{c['unit']}"
        if c.get("n", 1) > 1:
            v += f" ({fmt(c['min'])}-{fmt(c['max'])})"
        return v

    chk = [f"{c['status']:4}  {c['name']}: {vu(c)} (target {c['op']} "
           f"{c['threshold']}{c['unit']})" + (f"  [{c['note']}]" if c.get("note") else "")
           for c in checks]

    print()
    print("asiffs benchmark  " + cfg)
    for n in notes:
        print("NOTE: " + n)
    for title, text, _ in sections:
        print()
        print(title)
        print("\n".join(text))
    print()
    print("\n".join(extra))
    print()
    print("\n".join(chk))
    if errors:
        print("\nerrors:\n  " + "\n  ".join(errors))

    md = [f"<!-- generated by bench/run.sh; {cfg} -->"]
    md.extend(f"**Note:** {n}\n" for n in notes)
    for title, _, lines in sections:
        md.append(f"{title}:\n")
        md.extend(lines)
        md.append("")
    md.extend(f"- {e}" for e in extra)
    md.append("")
    md.append("| check | value | target | status |")
    md.append("|---|---:|---|---|")
    for c in checks:
        md.append(f"| {c['name']}" + (f" ({c['note']})" if c.get("note") else "")
                  + f" | {vu(c)} | {c['op']} {c['threshold']}{c['unit']} | {c['status']} |")
    with open(out_md, "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
